// The config schema: every user error names the key and what is wrong; the resolved config round-trips.
#include <gtest/gtest.h>

#include "core/error.h"
#include "config/config.h"

namespace moelab {
namespace {

std::string error_of(const std::string& toml, const std::vector<std::string>& overrides = {}) {
  try {
    config_from_string(toml, overrides, "test.toml");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Config, DefaultsAreValid) { EXPECT_NO_THROW(config_from_string("", {})); }

TEST(Config, ReadsSectionsAndOverrides) {
  const Config c = config_from_string("[model]\nd_model = 128\nn_heads = 8\nnorm = \"layernorm\"\n[train]\nlr = 1e-3\n",
                                      {"model.n_layers=6", "train.schedule=wsd", "model.bias=true"});
  EXPECT_EQ(c.model.d_model, 128);
  EXPECT_EQ(c.model.n_heads, 8);
  EXPECT_EQ(c.model.n_layers, 6);
  EXPECT_EQ(c.model.norm, NormKind::LayerNorm);
  EXPECT_TRUE(c.model.bias);
  EXPECT_DOUBLE_EQ(c.train.lr, 1e-3);
  EXPECT_EQ(c.train.schedule, ScheduleKind::WSD);
}

TEST(Config, UnknownKeyIsNamedWithSuggestion) {
  const std::string e = error_of("[model]\nd_modle = 3\n");
  EXPECT_NE(e.find("unknown config key 'model.d_modle'"), std::string::npos) << e;
  EXPECT_NE(e.find("did you mean 'model.d_model'"), std::string::npos) << e;
  EXPECT_NE(error_of("", {"train.learning_rate=1"}).find("train.learning_rate"), std::string::npos);
  EXPECT_NE(error_of("[optim]\nlr = 1\n").find("optim.lr"), std::string::npos);
}

TEST(Config, OutOfRangeAndWrongTypeAreNamed) {
  EXPECT_NE(error_of("[train]\nlr = -1.0\n").find("'train.lr'"), std::string::npos);
  EXPECT_NE(error_of("[train]\nlr = -1.0\n").find("out of range"), std::string::npos);
  EXPECT_NE(error_of("[model]\nn_layers = 0\n").find("'model.n_layers'"), std::string::npos);
  EXPECT_NE(error_of("[model]\nd_model = \"big\"\n").find("expects int"), std::string::npos);
  EXPECT_NE(error_of("[model]\nnorm = \"batchnorm\"\n").find("layernorm|rmsnorm"), std::string::npos);
  EXPECT_NE(error_of("", {"model.d_model=1.5"}).find("'model.d_model'"), std::string::npos);
  EXPECT_NE(error_of("", {"model.bias=maybe"}).find("'model.bias'"), std::string::npos);
  EXPECT_NE(error_of("", {"nonsense"}).find("key=value"), std::string::npos);
  EXPECT_NE(error_of("[model\n").find("cannot parse config test.toml"), std::string::npos);
}

// List keys are TOML arrays; the old comma-separated string is still read, with a deprecation warning that shows
// the array to write instead; --set takes a TOML array or one path; the resolved config writes the array back.
TEST(Config, ListKeysAreTomlArraysAndCommaStringsAreDeprecated) {
  const std::vector<std::string> two = {"a/ood_code.bin", "b/ood_web.bin"};
  testing::internal::CaptureStderr();
  EXPECT_EQ(config_from_string("[data]\nood_paths = [\"a/ood_code.bin\", \"b/ood_web.bin\"]\n", {}).data.ood_paths,
            two);
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "");
  testing::internal::CaptureStderr();
  EXPECT_EQ(config_from_string("[data]\nood_paths = \"a/ood_code.bin,b/ood_web.bin\"\n", {}, "old.toml").data.ood_paths,
            two);
  const std::string warning = testing::internal::GetCapturedStderr();
  EXPECT_NE(warning.find("warning: config key 'data.ood_paths' in old.toml is a comma-separated string, which is "
                         "deprecated; write a TOML array: ood_paths = [\"a/ood_code.bin\", \"b/ood_web.bin\"]"),
            std::string::npos)
      << warning;
  EXPECT_EQ(config_from_string("", {"data.ood_paths=[\"a/ood_code.bin\", \"b/ood_web.bin\"]"}).data.ood_paths, two);
  testing::internal::CaptureStderr();
  EXPECT_EQ(config_from_string("", {"data.ood_paths=a/ood_code.bin,b/ood_web.bin"}).data.ood_paths, two);
  const std::string from_set = testing::internal::GetCapturedStderr();
  EXPECT_NE(from_set.find("write a TOML array: --set 'data.ood_paths=[\"a/ood_code.bin\", \"b/ood_web.bin\"]'"),
            std::string::npos)
      << from_set;
  EXPECT_EQ(config_from_string("", {"data.ood_paths=a/ood_code.bin"}).data.ood_paths,
            std::vector<std::string>{"a/ood_code.bin"});
  EXPECT_TRUE(config_from_string("", {}).data.ood_paths.empty());
  EXPECT_NE(error_of("[data]\nood_paths = [1, 2]\n").find("'data.ood_paths' in test.toml expects [string]"),
            std::string::npos);
  EXPECT_NE(error_of("", {"data.ood_paths=[\"a\""}).find("is not a TOML array of strings"), std::string::npos);
  Config c = config_from_string("", {"data.ood_paths=[\"a/ood_code.bin\", \"b/ood_web.bin\"]"});
  const std::string text = to_toml(c);
  EXPECT_NE(text.find("ood_paths = [\"a/ood_code.bin\", \"b/ood_web.bin\"]"), std::string::npos) << text;
  EXPECT_EQ(config_from_string(text, {}).data.ood_paths, two);
}

TEST(Config, CrossKeyConstraints) {
  EXPECT_NE(error_of("", {"model.n_heads=3"}).find("not divisible"), std::string::npos);
  EXPECT_NE(error_of("", {"train.min_lr=1", "train.lr=0.1"}).find("train.min_lr"), std::string::npos);
  EXPECT_NE(error_of("", {"train.warmup_steps=10", "train.steps=5"}).find("train.warmup_steps"), std::string::npos);
  EXPECT_NE(error_of("", {"model.vocab_size=70000"}).find("uint32"), std::string::npos);
  EXPECT_NE(error_of("", {"model.d_model=12", "model.n_heads=4"}).find("even head dimension"), std::string::npos);
}

TEST(Config, ResolvedTomlRoundTrips) {
  const Config c = config_from_string("", {"model.d_model=96", "model.n_heads=3", "model.pos=learned",
                                           "train.out_dir=runs/with \"quotes\"", "train.lr=0.00123"});
  const std::string text = to_toml(c);
  const Config again = config_from_string(text, {});
  EXPECT_EQ(to_toml(again), text);
  EXPECT_EQ(again.train.out_dir, "runs/with \"quotes\"");
  EXPECT_DOUBLE_EQ(again.train.lr, 0.00123);
  EXPECT_EQ(again.model.pos, PosKind::Learned);
}

TEST(Config, EveryKeyIsListedWithHelp) {
  const auto keys = config_keys();
  EXPECT_GE(keys.size(), 30u);
  for (const auto& k : keys) {
    EXPECT_FALSE(k.help.empty()) << k.name;
    EXPECT_NE(k.name.find('.'), std::string::npos) << k.name;
  }
}

}  // namespace
}  // namespace moelab
