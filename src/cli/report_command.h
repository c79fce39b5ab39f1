#pragma once
// `moelab report DIR`: the HTML report of a study (docs/report.md).
namespace CLI {
class App;
}

namespace moelab {

void add_report_command(CLI::App& app);

}  // namespace moelab
