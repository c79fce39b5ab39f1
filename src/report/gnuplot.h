#pragma once
// Figures drawn by gnuplot (Debian's gnuplot-nox): a figure is a gnuplot script with its data inlined as
// datablocks, rendered to SVG by a gnuplot child process. The script is kept next to the SVG so every figure can
// be re-drawn or restyled by hand from exactly the numbers it shows.
#include <string>
#include <vector>

namespace moelab {

class GnuplotFigure {
 public:
  GnuplotFigure(int width_px, int height_px) : width_(width_px), height_(height_px) {}

  // Adds a datablock of rows (each row: numbers, NaN written as "NaN" so gnuplot skips the point) and returns
  // its name ("$d0", "$d1", ...) for use in plot commands. Rows of different lengths are allowed.
  std::string add_data(const std::vector<std::vector<double>>& rows);
  // Adds a datablock of text lines as they are (for labels); returns its name.
  std::string add_text_data(const std::vector<std::string>& lines);
  // Appends script commands (set ..., plot ..., multiplot ...). The terminal and output are set by render().
  void add(const std::string& commands) { commands_ += commands + "\n"; }

  // The whole script: terminal, datablocks, commands.
  std::string script(const std::string& svg_path) const;

  // Writes <stem>.gp and renders <stem>.svg through gnuplot; returns the SVG text. Throws Error (with gnuplot's
  // own message) when gnuplot is missing or rejects the script. Both files are written atomically.
  std::string render(const std::string& stem) const;

 private:
  int width_, height_;
  std::vector<std::string> blocks_;
  std::string commands_;
};

// True when a `gnuplot` executable is on PATH.
bool gnuplot_available();

// A string as a gnuplot double-quoted literal (quotes and backslashes escaped, enhanced-text specials too).
std::string gnuplot_quote(const std::string& text);

}  // namespace moelab
