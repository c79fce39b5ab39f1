#include "report/gnuplot.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sstream>

#include "core/error.h"
#include "core/io.h"

namespace moelab {
namespace {

// A file name as a gnuplot single-quoted string: no escapes inside, a quote is doubled.
std::string single_quoted(const std::string& path) {
  std::string out = "'";
  for (char c : path) out += (c == '\'' ? std::string("''") : std::string(1, c));
  return out + "'";
}

// A path for /bin/sh, in single quotes.
std::string shell_quote(const std::string& path) {
  std::string out = "'";
  for (char c : path) out += (c == '\'' ? std::string("'\\''") : std::string(1, c));
  return out + "'";
}

}  // namespace

std::string GnuplotFigure::add_data(const std::vector<std::vector<double>>& rows) {
  const std::string name = "$d" + std::to_string(blocks_.size());
  std::ostringstream out;
  out << name << " << EOD\n";
  char buf[32];
  for (const auto& row : rows) {
    for (size_t i = 0; i < row.size(); ++i) {
      if (std::isfinite(row[i])) {
        std::snprintf(buf, sizeof buf, "%.9g", row[i]);
        out << (i ? " " : "") << buf;
      } else {
        out << (i ? " " : "") << "NaN";
      }
    }
    out << "\n";
  }
  out << "EOD\n";
  blocks_.push_back(out.str());
  return name;
}

std::string GnuplotFigure::add_text_data(const std::vector<std::string>& lines) {
  const std::string name = "$d" + std::to_string(blocks_.size());
  std::string block = name + " << EOD\n";
  for (const auto& line : lines) block += line + "\n";
  block += "EOD\n";
  blocks_.push_back(block);
  return name;
}

std::string GnuplotFigure::script(const std::string& svg_path) const {
  std::ostringstream out;
  // Fixed pixel size (not "dynamic"), so the SVG has an intrinsic size an <img> can lay out.
  out << "set terminal svg size " << width_ << "," << height_
      << " enhanced font 'DejaVu Sans,12' background '#ffffff'\n";
  out << "set output " << single_quoted(svg_path) << "\n";
  out << "set encoding utf8\nset grid lc rgb '#dddddd'\nset key box opaque samplen 2 spacing 1.1\n";
  for (const auto& b : blocks_) out << b;
  out << commands_;
  out << "unset output\n";
  return out.str();
}

std::string GnuplotFigure::render(const std::string& stem) const {
  namespace fs = std::filesystem;
  const std::string svg_path = stem + ".svg", gp_path = stem + ".gp";
  const std::string tmp_svg = stem + ".svg.tmp", err_path = stem + ".gnuplot.err";
  // The kept script names its output relative to its own folder: `cd figures && gnuplot NAME.gp` redraws it.
  write_file_atomic(gp_path, script(fs::path(svg_path).filename().string()));
  // gnuplot writes to a temporary name, renamed only when it succeeded: no half-drawn figure survives.
  const std::string text = script(tmp_svg);
  write_file_atomic(stem + ".gp.tmp", text);
  const std::string command = "gnuplot " + shell_quote(stem + ".gp.tmp") + " 2> " + shell_quote(err_path);
  const int status = std::system(command.c_str());
  fs::remove(stem + ".gp.tmp");
  std::string err;
  if (fs::exists(err_path)) {
    err = read_file(err_path, "gnuplot messages");
    fs::remove(err_path);
  }
  if (status != 0 || !fs::exists(tmp_svg) || fs::file_size(tmp_svg) == 0) {
    fs::remove(tmp_svg);
    if (!gnuplot_available())
      throw Error("gnuplot is not installed: install Debian's gnuplot-nox (scripts/install-deps.sh does it)");
    throw Error("gnuplot failed on figure " + gp_path + ":\n" + err);
  }
  fs::rename(tmp_svg, svg_path);
  return read_file(svg_path, "figure");
}

bool gnuplot_available() { return std::system("command -v gnuplot > /dev/null 2>&1") == 0; }

std::string gnuplot_quote(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "/"; break;
      // Enhanced-text control characters, escaped so names like "c1e12-d64l2_x" print as written.
      case '_': case '^': case '@': case '&': case '{': case '}': case '~':
        out += "\\\\";
        out += c;
        break;
      default: out += c;
    }
  }
  return out + "\"";
}

}  // namespace moelab
