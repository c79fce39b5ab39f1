// The communicator seam and data parallelism. Run as one process (the single communicator) and, by CTest, under
// `mpirun -np 2` (tests dist.mpi2.*): the MPI communicator against naive loops, and a 2-rank data-parallel run
// against one process with twice the gradient accumulation.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "config/config.h"
#include "core/error.h"
#include "data/token_file.h"
#include "dist/comm.h"
#include "moe/expert_parallel.h"
#include "test_util.h"
#include "train/trainer.h"

namespace moelab {
namespace {

// Rank q's test vector: values that make a change of summation order visible (mixed magnitudes).
template <class T>
std::vector<T> rank_values(int q, int64_t n, uint64_t salt) {
  Rng rng(1000 * static_cast<uint64_t>(q) + salt);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>((rng.normal() * std::pow(10.0, static_cast<double>(rng.below(7)) - 3.0)));
  return v;
}

template <class T>
void check_allreduce(Communicator& c, int64_t n, uint64_t salt) {
  std::vector<T> x = rank_values<T>(c.rank(), n, salt);
  std::vector<T> expected = rank_values<T>(0, n, salt);
  for (int q = 1; q < c.size(); ++q) {
    const std::vector<T> v = rank_values<T>(q, n, salt);
    for (int64_t i = 0; i < n; ++i) expected[i] += v[i];  // rank order, left to right
  }
  c.allreduce_sum(x.data(), n);
  EXPECT_EQ(x, expected) << "n = " << n << " on rank " << c.rank();
}

TEST(Comm, AllreduceSumsInRankOrder) {
  Communicator& c = world_communicator();
  for (int64_t n : {0, 1, 3, 1000, 100003}) {
    check_allreduce<float>(c, n, 1);
    check_allreduce<double>(c, n, 2);
  }
  std::vector<int64_t> counts = {c.rank() + 1, 10};
  c.allreduce_sum(counts.data(), 2);
  EXPECT_EQ(counts[0], c.size() * (c.size() + 1) / 2);
  EXPECT_EQ(counts[1], 10 * c.size());
}

// Sender s sends (s * 7 + q * 3 + round) % 4 values to rank q (zero for some pairs, including to itself), value
// 1000 s + 100 q + j: each receiver knows what must arrive.
TEST(Comm, AlltoallvMatchesNaiveLoopsIncludingEmptySends) {
  Communicator& c = world_communicator();
  const int p = c.size(), me = c.rank();
  for (int round = 0; round < 4; ++round) {
    const auto count = [&](int s, int q) { return static_cast<int64_t>((s * 7 + q * 3 + round) % 4); };
    std::vector<int64_t> sc(p), so(p), rc(p), ro(p);
    int64_t send_total = 0, recv_total = 0;
    for (int q = 0; q < p; ++q) {
      sc[q] = count(me, q), so[q] = send_total, send_total += sc[q];
      rc[q] = count(q, me), ro[q] = recv_total, recv_total += rc[q];
    }
    std::vector<float> send(send_total), recv(recv_total, -1.f);
    for (int q = 0; q < p; ++q)
      for (int64_t j = 0; j < sc[q]; ++j) send[so[q] + j] = static_cast<float>(1000 * me + 100 * q + j);
    c.alltoallv(send.data(), sc.data(), so.data(), recv.data(), rc.data(), ro.data());
    for (int s = 0; s < p; ++s)
      for (int64_t j = 0; j < rc[s]; ++j)
        EXPECT_EQ(recv[ro[s] + j], static_cast<float>(1000 * s + 100 * me + j)) << "round " << round << " from " << s;
  }
  // fixed counts
  std::vector<int32_t> send(2 * p), recv(2 * p);
  for (int q = 0; q < p; ++q) send[2 * q] = me, send[2 * q + 1] = q;
  c.alltoall(send.data(), recv.data(), 2);
  for (int q = 0; q < p; ++q) {
    EXPECT_EQ(recv[2 * q], q);
    EXPECT_EQ(recv[2 * q + 1], me);
  }
}

TEST(Comm, AllgatherBroadcastSplitAndBarrier) {
  Communicator& c = world_communicator();
  const int p = c.size(), me = c.rank();
  std::vector<double> mine = {me * 1.5, -static_cast<double>(me)}, all(2 * p);
  c.allgather(mine.data(), 2, all.data());
  for (int q = 0; q < p; ++q) {
    EXPECT_EQ(all[2 * q], q * 1.5);
    EXPECT_EQ(all[2 * q + 1], -static_cast<double>(q));
  }
  std::vector<int64_t> value = {me == p - 1 ? 42 : 0, me == p - 1 ? 7 : 0};
  c.broadcast(value.data(), 2, p - 1);
  EXPECT_EQ(value, (std::vector<int64_t>{42, 7}));
  // even and odd ranks, each ordered by descending rank
  auto group = c.split(me % 2, -me);
  EXPECT_EQ(group->size(), (p + 1 - me % 2) / 2);
  double one = 1.0;
  group->allreduce_sum(&one, 1);
  EXPECT_EQ(one, group->size());
  int highest = me;
  for (int q = me + 2; q < p; q += 2) highest = q;
  EXPECT_EQ(group->rank(), (highest - me) / 2) << "ordered by key, then rank";
  c.barrier();
}

Config tiny(std::vector<std::string> extra) {
  std::vector<std::string> o = {"model.vocab_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
                                "model.seq_len=32",    "train.batch_size=4", "train.steps=50", "train.warmup_steps=5",
                                "train.lr=0.01",       "train.threads=1",   "train.grad_clip=1.0"};
  o.insert(o.end(), extra.begin(), extra.end());
  return config_from_string("", o);
}

std::string token_file(Communicator& c) {
  return testing::write_tokens(std::filesystem::temp_directory_path() /
                                   ("moelab_dist_tokens_" + std::to_string(c.rank()) + ".bin"),
                               40000, 64);
}

// N data-parallel ranks with grad_accum A see the windows of one process with grad_accum N x A, in the same order
// of micro-batches; the gradient sums differ only in how the micro-batches' contributions are added (rank order
// after each rank's own sum, against one running sum), so the curves agree to float rounding, not bitwise.
TEST(DataParallel, RanksMatchOneProcessWithMoreAccumulation) {
  Communicator& c = world_communicator();
  if (c.size() == 1) GTEST_SKIP() << "needs several ranks: CTest runs it under mpirun -np 2 (dist.mpi2.*)";
  TokenFile data(token_file(c), "uint16");
  for (const std::vector<std::string>& variant :
       {std::vector<std::string>{}, std::vector<std::string>{"moe.experts=4", "moe.top_k=2"}}) {
    const Config dp = tiny(variant);
    Config one = dp;
    one.train.grad_accum = dp.train.grad_accum * c.size();
    auto be_dp = testing::make_test_backend(1), be_one = testing::make_test_backend(1);
    Trainer ranks(dp, *be_dp, &c), single(one, *be_one);
    double max_diff = 0;
    for (int s = 0; s < 50; ++s) {
      const double a = ranks.step(data).loss, b = single.step(data).loss;
      max_diff = std::max(max_diff, std::fabs(a - b));
    }
    const double eval_dp = ranks.evaluate(data, 5), eval_one = single.evaluate(data, 5);
    // Measured over 50 steps (losses ~4.2 -> ~1.4): 2 ranks, dense 9.7e-8 and MoE 7.1e-8; 4 ranks, dense 1.1e-7 and
    // MoE 2.2e-3. A top-k choice between two near-equal router probabilities can go the other way once rounding
    // differs, and one token routed elsewhere moves an MoE curve by ~1e-3 (the first 12 steps of that 4-rank run
    // agree to 6e-9): hence the MoE tolerance.
    const double tolerance = variant.empty() ? 1e-6 : 5e-3;
    EXPECT_LT(max_diff, tolerance) << (variant.empty() ? "dense" : "moe");
    EXPECT_NEAR(eval_dp, eval_one, tolerance);
    if (c.rank() == 0)
      std::printf("%s: %d ranks vs 1 process, max |loss difference| over 50 steps = %.3g, eval %.6f vs %.6f\n",
                  variant.empty() ? "dense" : "moe", c.size(), max_diff, eval_dp, eval_one);
  }
}

// The same data-parallel run twice: bitwise the same losses (fixed reduction order).
TEST(DataParallel, BitwiseReproducibleForAWorldSize) {
  Communicator& c = world_communicator();
  TokenFile data(token_file(c), "uint16");
  const Config cfg = tiny({"moe.experts=4", "moe.top_k=2", "train.grad_accum=2"});
  auto be1 = testing::make_test_backend(1), be2 = testing::make_test_backend(1);
  Trainer first(cfg, *be1, &c), second(cfg, *be2, &c);
  for (int s = 0; s < 10; ++s) {
    const double a = first.step(data).loss, b = second.step(data).loss;
    EXPECT_EQ(a, b) << "step " << s;
  }
}

// The gradient sum goes in buckets (dist.bucket_mb), each element summed over the ranks in rank order whatever bucket
// holds it: buckets of 2 KiB (hundreds of them, runs cut mid-tensor) give the bits of one bucket for everything,
// data parallel and expert parallel alike.
TEST(DataParallel, GradientBucketsDoNotChangeABit) {
  Communicator& c = world_communicator();
  TokenFile data(token_file(c), "uint16");
  for (const std::string& parallel : {std::string("dist.expert_parallel=1"), "dist.expert_parallel=" + std::to_string(c.size())}) {
    const std::vector<std::string> keys = {"moe.experts=4", "moe.top_k=2", parallel};
    std::vector<std::string> small = keys, whole = keys;
    small.push_back("dist.bucket_mb=0.002");
    whole.push_back("dist.bucket_mb=1000");
    auto be1 = testing::make_test_backend(1), be2 = testing::make_test_backend(1);
    Trainer a(tiny(small), *be1, &c), b(tiny(whole), *be2, &c);
    for (int s = 0; s < 3; ++s) {
      const StepStats x = a.step(data), y = b.step(data);
      EXPECT_EQ(x.loss, y.loss) << parallel << ", step " << s;
      EXPECT_EQ(x.grad_norm, y.grad_norm) << parallel << ", step " << s;
    }
    EXPECT_EQ(be1->download_vector(std::as_const(a.model()).params(), a.model().num_params()),
              be2->download_vector(std::as_const(b.model()).params(), b.model().num_params()))
        << parallel;
  }
}

// Expert parallelism over all ranks against one process that runs every rank's micro-batch (grad_accum = ranks):
// the same routing (each rank routes its own tokens, with its own capacity), the experts computing on rows from
// every rank. Losses and every gradient (the expert shards gathered) agree to float rounding: an expert's rows from
// both ranks go through one product instead of two, and its weight gradient sums them in one pass.
struct EpCase {
  const char* name;
  std::vector<std::string> keys;
};

TEST(ExpertParallel, MatchesOneProcessForEveryRouter) {
  Communicator& c = world_communicator();
  if (c.size() == 1) GTEST_SKIP() << "needs several ranks: CTest runs it under mpirun -np 2 (dist.mpi2.*)";
  TokenFile data(token_file(c), "uint16");
  const std::vector<EpCase> cases = {
      {"token choice top-2, capacity 1.0", {"moe.experts=4", "moe.top_k=2", "moe.capacity_factor=1.0"}},
      {"token choice top-2, dropless", {"moe.experts=4", "moe.top_k=2", "moe.capacity_factor=0"}},
      {"expert choice", {"moe.experts=4", "moe.top_k=2", "moe.router=expert_choice"}},
      {"fine-grained G = 4", {"moe.expansion=2", "moe.granularity=4", "moe.top_k=1"}},
      {"shared expert, SwiGLU, biases", {"moe.experts=4", "moe.top_k=1", "moe.shared_experts=1", "model.ffn=swiglu",
                                         "model.bias=true"}},
  };
  // P = every rank, and with 4 or more ranks also groups of 2 (expert parallelism composed with data parallelism
  // over the groups: CTest's dist.mpi4)
  std::vector<int> groups = {c.size()};
  if (c.size() > 2 && c.size() % 2 == 0) groups.push_back(2);
  for (int group : groups)
  for (const EpCase& k : cases) {
    const std::string P = std::to_string(group);
    auto keys = k.keys;
    keys.push_back("dist.expert_parallel=" + P);
    const Config ep = tiny(keys);
    Config one = tiny(k.keys);
    one.train.grad_accum = c.size();
    auto be_ep = testing::make_test_backend(1), be_one = testing::make_test_backend(1);
    Trainer ranks(ep, *be_ep, &c), single(one, *be_one);
    // the first step's gradients, every tensor
    const StepStats a = ranks.compute_gradients(ranks.batches(data));
    const StepStats b = single.compute_gradients(single.batches(data));
    EXPECT_NEAR(a.loss, b.loss, 1e-5) << k.name;
    const std::vector<float> g_ep = ranks.full_gradients(), g_one = single.full_gradients();
    ASSERT_EQ(g_ep.size(), g_one.size()) << k.name;
    double worst = 0;
    std::string worst_name;
    for (const auto& e : single.model().layout().entries()) {
      double diff = 0, norm = 0;
      for (int64_t i = e.offset; i < e.offset + e.shape.numel(); ++i) {
        diff = std::max(diff, std::fabs(static_cast<double>(g_ep[i]) - g_one[i]));
        norm = std::max(norm, std::fabs(static_cast<double>(g_one[i])));
      }
      const double rel = diff / std::max(norm, 1e-8);
      if (rel > worst) worst = rel, worst_name = e.name;
    }
    // measured with 2 ranks: 3.7e-7 .. 5.5e-7 (relative to the tensor's largest gradient)
    EXPECT_LT(worst, 1e-5) << k.name << ": worst tensor " << worst_name;
    // then training: the curves
    double max_diff = 0;
    for (int s = 0; s < 10; ++s) {
      const double x = ranks.step(data).loss, y = single.step(data).loss;
      max_diff = std::max(max_diff, std::fabs(x - y));
    }
    EXPECT_LT(max_diff, 1e-6) << k.name;  // measured 2e-8 .. 1.4e-7
    if (c.rank() == 0)
      std::printf("EP %s of %d: %s: first-step gradients worst relative difference %.2g (%s), loss curve max |diff| over "
                  "10 steps %.2g\n", P.c_str(), c.size(), k.name, worst, worst_name.c_str(), max_diff);
  }
}

// The experts' all-to-all on its own: rank s sends count(s, e) rows for expert e (rank 0 sends nothing at all, and
// some experts get no row from anyone); each rank must receive its experts' rows expert-major (expert, then source
// rank, then the sender's order), and combine must bring every row back to where it was.
TEST(ExpertParallel, ExchangeDeliversRowsExpertMajorAndBack) {
  Communicator& c = world_communicator();
  const int p = c.size(), me = c.rank();
  const int64_t E = 3 * p, cols = 3;
  auto count = [&](int s, int64_t e) -> int64_t { return s == 0 || e % 3 == 2 ? 0 : (s + e) % 3 + 1; };
  auto value = [&](int s, int64_t e, int64_t j, int64_t col) {
    return static_cast<float>(1000 * s + 10 * e + j) + 0.25f * static_cast<float>(col);
  };
  std::vector<int64_t> offsets(E + 1, 0);
  std::vector<float> rows;
  for (int64_t e = 0; e < E; ++e) {
    offsets[e + 1] = offsets[e] + count(me, e);
    for (int64_t j = 0; j < count(me, e); ++j)
      for (int64_t col = 0; col < cols; ++col) rows.push_back(value(me, e, j, col));
  }
  auto be = make_backend("cpu", 1);
  const int64_t R = offsets[E];
  BackendArray<float> d_rows(*be, R * cols), back(*be, R * cols);
  be->upload(d_rows.data(), rows.data(), R * cols);
  ExpertExchange ex(c, E);
  EXPECT_EQ(ex.local_experts(), 3);
  EXPECT_EQ(ex.first_expert(), 3 * me);
  ex.plan(offsets);
  BackendArray<float> local(*be, std::max<int64_t>(ex.received_rows(), 1) * cols);
  ex.dispatch(*be, d_rows.data(), cols, local.data());
  const std::vector<float> got = be->download_vector(local.data(), ex.received_rows() * cols);
  int64_t at = 0;
  for (int64_t el = 0; el < 3; ++el) {
    EXPECT_EQ(ex.local_offsets()[el], at) << "expert " << el;
    const int64_t e = ex.first_expert() + el;
    for (int s = 0; s < p; ++s)
      for (int64_t j = 0; j < count(s, e); ++j, ++at)
        for (int64_t col = 0; col < cols; ++col)
          ASSERT_EQ(got[at * cols + col], value(s, e, j, col)) << "expert " << e << " from rank " << s << " row " << j;
  }
  EXPECT_EQ(ex.received_rows(), at);
  ex.combine(*be, local.data(), cols, back.data());
  EXPECT_EQ(be->download_vector(back.data(), R * cols), rows) << "rows back where they came from";
}

// P must divide the world size and the routed experts, and there must be experts: one clear message each.
TEST(ExpertParallel, MismatchesAreClearErrors) {
  Communicator& c = world_communicator();
  auto be = testing::make_test_backend(1);
  const auto message = [&](std::vector<std::string> keys) {
    try {
      Trainer t(tiny(keys), *be, &c);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string more = std::to_string(c.size() + 1);
  EXPECT_NE(message({"moe.experts=4", "dist.expert_parallel=" + more}).find("does not divide the " +
                                                                         std::to_string(c.size()) + " processes"),
            std::string::npos);
  EXPECT_NE(message({"dist.expert_parallel=2"}).find("needs MoE layers"), std::string::npos)
      << "dense model";
  if (c.size() > 1) {
    EXPECT_NE(message({"moe.experts=3", "dist.expert_parallel=" + std::to_string(c.size())})
                  .find("does not divide the 3 routed experts"),
              std::string::npos);
  }
}


#ifdef MOELAB_MPIEXEC
namespace fs = std::filesystem;

// `mpirun -np 2 moelab train args...` with its output in log; returns mpirun's pid (not waited for).
pid_t spawn_job(const std::vector<std::string>& args, const fs::path& log) {
  const pid_t pid = fork();
  if (pid == 0) {
    std::vector<std::string> all = {MOELAB_MPIEXEC, "-np", "2", "--allow-run-as-root", "--oversubscribe", MOELAB_BINARY};
    all.insert(all.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : all) argv.push_back(a.data());
    argv.push_back(nullptr);
    FILE* f = std::fopen(log.c_str(), "w");
    dup2(fileno(f), 1);
    dup2(fileno(f), 2);
    ::setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", 1);
    ::setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    execv(all[0].c_str(), argv.data());
    _exit(127);
  }
  return pid;
}

// The pid of rank `rank` among mpirun's children (OMPI_COMM_WORLD_RANK in its environment), or -1.
pid_t rank_pid(pid_t mpirun, int rank) {
  for (const auto& entry : fs::directory_iterator("/proc")) {
    const std::string name = entry.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat(entry.path() / "stat");
    std::string pid, comm, state;
    long ppid = 0;
    if (!(stat >> pid >> comm >> state >> ppid) || ppid != mpirun) continue;
    std::ifstream env(entry.path() / "environ", std::ios::binary);
    std::string var;
    while (std::getline(env, var, '\0'))
      if (var == "OMPI_COMM_WORLD_RANK=" + std::to_string(rank)) return static_cast<pid_t>(std::stol(name));
  }
  return -1;
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A 2-process expert-parallel run whose rank 1 is killed with SIGKILL mid-way: the job dies, and the relaunch with
// --resume continues onto the uninterrupted run's curve, bit for bit. Only rank 0 writes the run directory.
TEST(MpiRun, KillNineOfOneRankThenResumeGivesTheUninterruptedCurve) {
  if (world_communicator().size() > 1) GTEST_SKIP() << "launches its own mpirun jobs; run without mpirun";
  const fs::path dir = fs::temp_directory_path() / ("moelab_mpi_kill_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string tokens = testing::write_tokens(dir / "tokens.bin", 40000, 256);
  const std::vector<std::string> args = {
      "train", "--set", "data.train_path=" + tokens, "--set", "model.vocab_size=256", "--set", "model.d_model=64",
      "--set", "model.n_layers=2", "--set", "model.n_heads=4", "--set", "model.seq_len=64", "--set",
      "train.batch_size=4", "--set", "train.steps=150", "--set", "train.warmup_steps=5", "--set", "train.threads=1",
      "--set", "train.checkpoint_every=10", "--set", "train.log_every=10", "--set", "moe.experts=4", "--set",
      "moe.top_k=2", "--set", "dist.expert_parallel=2"};
  auto with_out = [&](const fs::path& out, bool resume) {
    auto a = args;
    a.insert(a.end(), {"--set", "train.out_dir=" + out.string()});
    if (resume) a.push_back("--resume");
    return a;
  };
  int status = 0;
  waitpid(spawn_job(with_out(dir / "full", false), dir / "full.log"), &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_text(dir / "full.log");
  const auto reference = testing::losses_of(dir / "full" / "metrics.jsonl");
  ASSERT_EQ(reference.size(), 150u) << "rank 0 alone writes one line per step";
  const std::string log = read_text(dir / "full.log");
  size_t progress = 0;
  for (size_t at = log.find("step    150/150"); at != std::string::npos; at = log.find("step    150/150", at + 1)) ++progress;
  EXPECT_EQ(progress, 1u) << "one progress line per step, from rank 0:\n" << log;

  const pid_t job = spawn_job(with_out(dir / "killed", false), dir / "killed.log");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (std::chrono::steady_clock::now() < deadline && testing::losses_of(dir / "killed" / "metrics.jsonl").size() < 45)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  const pid_t victim = rank_pid(job, 1);
  ASSERT_GT(victim, 0) << "rank 1 of the job not found";
  ::kill(victim, SIGKILL);
  waitpid(job, &status, 0);
  ASSERT_FALSE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the job finished before rank 1 was killed";
  const size_t at_kill = testing::losses_of(dir / "killed" / "metrics.jsonl").size();
  EXPECT_LT(at_kill, 150u);
  ASSERT_TRUE(fs::exists(dir / "killed" / "checkpoint" / "state.json"));

  waitpid(spawn_job(with_out(dir / "killed", true), dir / "resumed.log"), &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_text(dir / "resumed.log");
  const auto resumed = testing::losses_of(dir / "killed" / "metrics.jsonl");
  ASSERT_EQ(resumed.size(), reference.size());
  for (size_t i = 0; i < reference.size(); ++i) EXPECT_EQ(resumed[i], reference[i]) << "step " << i + 1;
  std::printf("killed rank 1 after %zu steps; the resumed run matched all %zu losses bit for bit\n", at_kill,
              reference.size());
  fs::remove_all(dir);
}
#endif

}  // namespace
}  // namespace moelab
