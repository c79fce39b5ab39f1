#include "data/bytes.h"

#include <cstdint>

#include "core/error.h"
#include "core/io.h"
#include "data/shard.h"
#include "data/tokenizer.h"

namespace moelab {

ByteEncodeResult encode_bytes(const std::vector<std::string>& inputs, const std::string& train_out,
                              const std::string& val_out, double val_fraction) {
  if (inputs.empty()) throw Error("no input files given");
  const std::vector<std::string> files = list_input_files(inputs);  // directories: every file, sorted
  ShardWriter train(train_out, 256);
  std::unique_ptr<ShardWriter> val;
  if (!val_out.empty()) val = std::make_unique<ShardWriter>(val_out, 256);
  std::vector<int32_t> ids;
  for (const auto& path : files) {
    const std::string text = read_file(path, "input text");
    const size_t split = val ? static_cast<size_t>(text.size() * (1.0 - val_fraction)) : text.size();
    ids.assign(text.begin(), text.begin() + split);
    for (auto& id : ids) id &= 0xff;  // chars may be signed
    train.append(ids);
    if (val) {
      ids.assign(text.begin() + split, text.end());
      for (auto& id : ids) id &= 0xff;
      val->append(ids);
    }
  }
  ByteEncodeResult result;
  if (train.token_count() == 0) throw Error("the input files are empty: nothing to encode");
  result.train_tokens = static_cast<int64_t>(train.finish());
  if (val) result.val_tokens = static_cast<int64_t>(val->finish());
  return result;
}

}  // namespace moelab
