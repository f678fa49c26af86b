#pragma once
// The data side of a word-level language model: text files read into words, the King James
// Bible read book by book, a fixed train / valid / test split, a vocabulary that can be saved
// beside a checkpoint, and batches for truncated backpropagation through time.
//
//   auto split = moe::lm::read_split("kjv.txt");          // examples/lm/get-kjv kjv.txt
//   moe::lm::Vocabulary vocab(split.train, 10000);
//   vocab.save("vocab.txt");
//   moe::lm::Batcher batches(vocab.encode(split.train), 32, 35);
//   std::vector<moe::Index> x, y;                          // [steps x batch], time-major
//   while (batches.next(x, y)) { /* y[t * batch + b] follows x[t * batch + b] */ }
//
// Tokenization (tokenize, and every reader): lowercase ASCII; a word is a maximal run of letters
// A-Z, a-z, keeping an apostrophe that has a letter on both sides ("lord's", "don't"; the
// apostrophes of "sons'" and "'tis" go); a maximal run of digits 0-9 is one token; each of the
// marks . , ; : ? ! is a token of its own; everything else (spaces, other punctuation, bytes
// outside ASCII) only separates. So "The LORD's house, 12 cubits!" is
// the lord's house , 12 cubits !

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

#include "moe/error.hpp"
#include "moe/io/atomic_file.hpp"
#include "moe/view.hpp"

namespace moe::lm {

// The two words every vocabulary starts with: any word it does not hold, and the end of a verse
// (KJV) or of a paragraph (plain text). The tokenizer never produces either.
inline constexpr std::string_view kUnk = "<unk>";
inline constexpr std::string_view kEos = "<eos>";

namespace detail {

inline bool is_letter(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
inline bool is_digit(char c) { return c >= '0' && c <= '9'; }
inline bool is_mark(char c) { return c == '.' || c == ',' || c == ';' || c == ':' || c == '?' || c == '!'; }
inline bool is_blank(std::string_view line) { return line.find_first_not_of(" \t\r\f\v") == std::string_view::npos; }
inline char lower(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; }

// Appends the tokens of text to out (the rules at the top of this file).
inline void append_tokens(std::string_view text, std::vector<std::string>& out) {
  const std::size_t n = text.size();
  std::size_t i = 0;
  while (i < n) {
    const char c = text[i];
    if (is_letter(c)) {
      std::string word;
      // An apostrophe is taken only when a letter follows, so a word never ends with one.
      while (i < n && (is_letter(text[i]) || (text[i] == '\'' && i + 1 < n && is_letter(text[i + 1])))) {
        word += lower(text[i++]);
      }
      out.push_back(std::move(word));
    } else if (is_digit(c)) {
      const std::size_t start = i;
      while (i < n && is_digit(text[i])) ++i;
      out.emplace_back(text.substr(start, i - start));
    } else {
      if (is_mark(c)) out.emplace_back(1, c);
      ++i;
    }
  }
}

// The whole file, or moe::Error naming the path and why it cannot be read.
inline std::string read_text(const std::string& path, std::string_view where) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const auto status = fs::status(path, ec);
  moe::detail::require(fs::exists(status), where, ": '", path, "' does not exist, expected a text file");
  moe::detail::require(!fs::is_directory(status), where, ": '", path, "' is a directory, expected a text file");
  std::ifstream in(path, std::ios::binary);
  const int err = errno;
  moe::detail::require(in.is_open(), where, ": cannot open '", path, "' (", std::generic_category().message(err),
                       "), expected a readable text file");
  std::string text;
  char chunk[1 << 16];
  while (in.read(chunk, sizeof chunk) || in.gcount() > 0) text.append(chunk, static_cast<std::size_t>(in.gcount()));
  moe::detail::require(!in.bad(), where, ": cannot read '", path, "', expected a readable text file");
  return text;
}

// The lines of text without their '\n' (and a '\r' before it); no empty last line for a final '\n'.
inline std::vector<std::string_view> lines_of(std::string_view text) {
  std::vector<std::string_view> lines;
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t end = text.find('\n', start);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(start, end - start);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    lines.push_back(line);
    start = end + 1;
  }
  return lines;
}

// A language model predicts each word from the ones before it: it needs at least two.
inline void require_two_words(std::string_view where, const std::string& path, std::size_t count,
                              std::string_view first) {
  moe::detail::require(count > 0, where, ": '", path,
                       "' holds no words, expected a text of at least 2 words (letters, digits or . , ; : ? !)");
  moe::detail::require(count > 1, where, ": '", path, "' holds a single word ('", first,
                       "'), expected a text of at least 2 words");
}

// "<Book name> <chapter>" where the name is words of letters, the first of which may be a number
// ("1 Samuel", "Song of Solomon"). Returns the name.
inline std::optional<std::string_view> chapter_header(std::string_view line) {
  while (!line.empty() && (line.back() == ' ' || line.back() == '\t')) line.remove_suffix(1);
  const std::size_t space = line.rfind(' ');
  if (line.empty() || (!is_letter(line.front()) && !is_digit(line.front()))) return std::nullopt;
  if (space == std::string_view::npos || space + 1 == line.size()) return std::nullopt;
  const std::string_view number = line.substr(space + 1), name = line.substr(0, space);
  if (!std::all_of(number.begin(), number.end(), is_digit)) return std::nullopt;
  bool has_letters = false;
  std::size_t start = 0;
  for (bool first = true; start <= name.size(); first = false) {
    std::size_t end = name.find(' ', start);
    if (end == std::string_view::npos) end = name.size();
    const std::string_view part = name.substr(start, end - start);
    const bool letters = !part.empty() && std::all_of(part.begin(), part.end(), is_letter);
    const bool digits = !part.empty() && std::all_of(part.begin(), part.end(), is_digit);
    if (!letters && !(first && digits)) return std::nullopt;
    has_letters = has_letters || letters;
    start = end + 1;
  }
  if (!has_letters) return std::nullopt;
  return name;
}

// "  <number> text": the text, or nullopt when the line does not start a verse.
inline std::optional<std::string_view> verse_start(std::string_view line) {
  std::size_t i = 0;
  while (i < line.size() && line[i] == ' ') ++i;
  if (i == 0 || i == line.size() || !is_digit(line[i])) return std::nullopt;
  while (i < line.size() && is_digit(line[i])) ++i;
  if (i < line.size() && line[i] != ' ') return std::nullopt;
  return line.substr(i);
}

}  // namespace detail

// The tokens of text (the rules at the top of this file).
inline std::vector<std::string> tokenize(std::string_view text) {
  std::vector<std::string> out;
  detail::append_tokens(text, out);
  return out;
}

// The words of a text file. Throws moe::Error when the file is missing or unreadable, or holds
// fewer than 2 words.
inline std::vector<std::string> read_words(const std::string& path) {
  constexpr std::string_view where = "moe::lm::read_words";
  std::vector<std::string> words = tokenize(detail::read_text(path, where));
  detail::require_two_words(where, path, words.size(), words.empty() ? "" : words.front());
  return words;
}

// A run of text with a name: one book of the Bible, or a whole plain text file.
struct Document {
  std::string title;
  std::vector<std::string> words;  // each verse (or paragraph) followed by "<eos>"
};

// Whether path is read as the King James Bible: its first non-blank line is "Genesis 1" (what
// `bible "Gen1:1-Rev22:21"` from the Debian package bible-kjv prints; examples/lm/get-kjv).
inline bool is_kjv(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::string line;
  while (std::getline(in, line)) {
    if (detail::is_blank(line)) continue;
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.pop_back();
    return line == "Genesis 1";
  }
  return false;
}

// The King James Bible in the format of `bible "Gen1:1-Rev22:21"`, one Document per book (its
// chapters one after another). A chapter header is a line "<Book name> <chapter>" at the start of
// the file or after a blank line (so a verse's wrapped line that happens to end in a number is
// not one); a verse is a line "  <number> text" and the lines after it up to the next verse,
// header or blank line. Headers and verse numbers are dropped; each verse ends with "<eos>".
// Throws moe::Error for an unreadable file, text outside any verse, a book whose chapters are not
// together, a book without verses, or no chapter header at all.
inline std::vector<Document> read_kjv(const std::string& path) {
  constexpr std::string_view where = "moe::lm::read_kjv";
  const std::string text = detail::read_text(path, where);
  const std::vector<std::string_view> lines = detail::lines_of(text);
  std::vector<Document> books;
  bool in_verse = false, after_blank = true;
  auto end_verse = [&] {
    if (in_verse) books.back().words.emplace_back(kEos);
    in_verse = false;
  };
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const std::string_view line = lines[i];
    const std::size_t number = i + 1;
    const bool blank = detail::is_blank(line);
    const bool was_after_blank = after_blank;
    after_blank = blank;
    if (blank) {
      end_verse();
      continue;
    }
    if (was_after_blank) {
      if (const auto name = detail::chapter_header(line)) {
        end_verse();
        if (books.empty() || books.back().title != *name) {
          for (const Document& book : books) {
            moe::detail::require(book.title != *name, where, ": '", path, "' line ", number, ": book '", *name,
                                 "' appears again after '", books.back().title,
                                 "', expected each book's chapters one after another");
          }
          // (The message is built even when the check passes: it must not read an empty list.)
          const std::string last = books.empty() ? std::string() : books.back().title;
          moe::detail::require(books.empty() || !books.back().words.empty(), where, ": '", path, "' line ", number,
                               ": book '", last, "' has no verses, expected \"  <number> text\" lines");
          books.push_back(Document{std::string(*name), {}});
        }
        continue;
      }
    }
    if (const auto verse = detail::verse_start(line)) {
      moe::detail::require(!books.empty(), where, ": '", path, "' line ", number,
                           ": a verse before the first chapter header, expected a line like 'Genesis 1' first");
      end_verse();
      detail::append_tokens(*verse, books.back().words);
      in_verse = true;
      continue;
    }
    moe::detail::require(in_verse, where, ": '", path, "' line ", number, ": '", line,
                         "' is neither a chapter header (\"Genesis 1\" after a blank line), a verse (\"  1 text\") "
                         "nor a verse's continuation");
    detail::append_tokens(line, books.back().words);
  }
  end_verse();
  moe::detail::require(
      !books.empty(), where, ": '", path,
      "' has no chapter header, expected the King James Bible as `bible \"Gen1:1-Rev22:21\"` prints it "
      "(examples/lm/get-kjv)");
  moe::detail::require(!books.back().words.empty(), where, ": '", path, "': book '", books.back().title,
                       "' has no verses, expected \"  <number> text\" lines");
  return books;
}

// A plain text file as one Document titled with the file's name: its words, with "<eos>" at the
// end of each paragraph (paragraphs are separated by blank lines; a file without blank lines is
// one paragraph). Throws moe::Error when the file is missing or unreadable, or holds fewer than 2
// words.
inline Document read_plain(const std::string& path) {
  constexpr std::string_view where = "moe::lm::read_plain";
  const std::string text = detail::read_text(path, where);
  Document doc{std::filesystem::path(path).filename().string(), {}};
  std::size_t count = 0;
  std::string first;
  bool open = false;  // words since the last "<eos>"
  for (const std::string_view line : detail::lines_of(text)) {
    if (detail::is_blank(line)) {
      if (open) doc.words.emplace_back(kEos);
      open = false;
      continue;
    }
    const std::size_t before = doc.words.size();
    detail::append_tokens(line, doc.words);
    if (count == 0 && doc.words.size() > before) first = doc.words[before];
    count += doc.words.size() - before;
    open = open || doc.words.size() > before;
  }
  if (open) doc.words.emplace_back(kEos);
  detail::require_two_words(where, path, count, first);
  return doc;
}

// Words for training, for choosing hyperparameters and for the final score.
struct Split {
  std::vector<std::string> train, valid, test;
};

// The fixed split of the KJV, by book: book i (0 = Genesis) goes to test when i % 12 == 5
// (Joshua, Job, Amos, Luke, 1 Timothy, Revelation), to valid when i % 12 == 3 (Numbers, Nehemiah,
// Hosea, Matthew, 1 Thessalonians, 3 John), to train otherwise: about 80 / 10 / 10 % of the
// words. Throws moe::Error when a part comes out empty: the split needs at least 6 books, books 3
// and 5 not empty.
inline Split split_kjv(const std::vector<Document>& books) {
  Split split;
  for (std::size_t i = 0; i < books.size(); ++i) {
    auto& part = i % 12 == 5 ? split.test : i % 12 == 3 ? split.valid : split.train;
    part.insert(part.end(), books[i].words.begin(), books[i].words.end());
  }
  moe::detail::require(!split.train.empty() && !split.valid.empty() && !split.test.empty(),
                       "moe::lm::split_kjv: ", books.size(), " books give train ", split.train.size(), ", valid ",
                       split.valid.size(), " and test ", split.test.size(),
                       " words; the corpus is too small: expected at least 6 books, books 3 and 5 not empty "
                       "(book i goes to test when i % 12 == 5, to valid when i % 12 == 3, to train otherwise)");
  return split;
}

// The split of one document by position: the first 80 % of the words train, the next 10 % valid,
// the last 10 % test. Each cut moves to the nearest end of a paragraph (just after an "<eos>")
// within 5 % of the words of it, if there is one; else it stays where it falls. Throws moe::Error
// below 10 words ("<eos>" marks included), the fewest for which no part is empty.
inline Split split_plain(const Document& doc) {
  const std::vector<std::string>& words = doc.words;
  const std::size_t n = words.size();
  moe::detail::require(n >= 10, "moe::lm::split_plain: '", doc.title, "' has ", n,
                       " words (<eos> marks included); the corpus is too small: expected at least 10 so that "
                       "train, valid and test (80 / 10 / 10 %) each get one");
  const std::size_t tolerance = n / 20, t1 = n * 8 / 10, t2 = n * 9 / 10;
  // The boundary in [lo, hi] nearest to target (the earlier of two as near), else target.
  auto snap = [&](std::size_t target, std::size_t lo, std::size_t hi) {
    std::optional<std::size_t> best;
    for (std::size_t b = lo; b <= hi; ++b) {
      const std::size_t distance = b > target ? b - target : target - b;
      const bool nearer = !best || distance < (*best > target ? *best - target : target - *best);
      if (words[b - 1] == kEos && nearer) best = b;
    }
    return best.value_or(target);
  };
  const std::size_t c1 = snap(t1, std::max<std::size_t>(1, t1 - tolerance), std::min(t1 + tolerance, t2 - 1));
  const std::size_t c2 = snap(t2, std::max(c1 + 1, t2 - tolerance), std::min(t2 + tolerance, n - 1));
  const auto at = [&](std::size_t i) { return words.begin() + static_cast<std::ptrdiff_t>(i); };
  return Split{{words.begin(), at(c1)}, {at(c1), at(c2)}, {at(c2), words.end()}};
}

// Reads path and splits it: split_kjv(read_kjv(path)) when is_kjv(path), else
// split_plain(read_plain(path)).
inline Split read_split(const std::string& path) {
  return is_kjv(path) ? split_kjv(read_kjv(path)) : split_plain(read_plain(path));
}

// Words and their ids: "<unk>" (0), "<eos>" (1), then the max_size - 2 most frequent words of the
// training text, most frequent first, ties in byte order of the words, so the same text always
// gives the same ids. Saved as one word per line in id order, beside the model it was trained with.
class Vocabulary {
 public:
  static constexpr Index kUnkId = 0;
  static constexpr Index kEosId = 1;

  // Just "<unk>" and "<eos>".
  Vocabulary() {
    add(std::string(kUnk));
    add(std::string(kEos));
  }

  Vocabulary(const std::vector<std::string>& train, Index max_size) : Vocabulary() {
    moe::detail::require(max_size >= 2, "moe::lm::Vocabulary: max_size = ", max_size,
                         ", expected at least 2 (<unk> and <eos>)");
    std::unordered_map<std::string, Index> counts;
    for (const std::string& w : train) {
      if (w != kUnk && w != kEos) ++counts[w];
    }
    std::vector<std::pair<std::string, Index>> ranked(counts.begin(), counts.end());
    std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) {
      return a.second != b.second ? a.second > b.second : a.first < b.first;
    });
    const std::size_t keep = std::min(ranked.size(), static_cast<std::size_t>(max_size - 2));
    for (std::size_t i = 0; i < keep; ++i) add(std::move(ranked[i].first));
  }

  // The id of word, kUnkId for a word the vocabulary does not hold.
  [[nodiscard]] Index id(const std::string& word) const {
    const auto it = ids_.find(word);
    return it == ids_.end() ? kUnkId : it->second;
  }

  [[nodiscard]] const std::string& word(Index id) const {
    moe::detail::require(id >= 0 && id < size(), "moe::lm::Vocabulary::word: id = ", id,
                         ", expected 0 <= id < size = ", size());
    return words_[static_cast<std::size_t>(id)];
  }

  [[nodiscard]] Index size() const { return static_cast<Index>(words_.size()); }

  [[nodiscard]] std::vector<Index> encode(const std::vector<std::string>& words) const {
    std::vector<Index> ids;
    ids.reserve(words.size());
    for (const std::string& w : words) ids.push_back(id(w));
    return ids;
  }

  // One word per line in id order: what save writes and parse reads.
  [[nodiscard]] std::string text() const {
    std::string out;
    for (const std::string& w : words_) (out += w) += '\n';
    return out;
  }

  // Writes text(), atomically (a temporary file renamed over path).
  void save(const std::string& path) const {
    const std::string text = this->text();
    moe::io::write_file_atomically(path, std::as_bytes(std::span<const char>(text.data(), text.size())));
  }

  // Reads what save wrote. Throws moe::Error naming the path and the line when the file is missing
  // or does not hold "<unk>", "<eos>" and then distinct words, one a line, without spaces.
  [[nodiscard]] static Vocabulary load(const std::string& path) {
    constexpr std::string_view where = "moe::lm::Vocabulary::load";
    return parse(detail::read_text(path, where), where, path);
  }

  // The text save writes (what text() returns), checked as load checks a file; who and path name
  // the caller and the source in the errors.
  [[nodiscard]] static Vocabulary parse(const std::string& text, std::string_view who, const std::string& path) {
    const std::string_view where = who;
    const std::vector<std::string_view> lines = detail::lines_of(text);
    moe::detail::require(lines.size() >= 2 && lines[0] == kUnk && lines[1] == kEos, where, ": '", path,
                         "' starts with '", lines.empty() ? "" : lines[0], "', '", lines.size() < 2 ? "" : lines[1],
                         "', expected '<unk>' and '<eos>' on its first two lines (a file written by Vocabulary::save)");
    Vocabulary vocab;
    for (std::size_t i = 2; i < lines.size(); ++i) {
      const std::string_view w = lines[i];
      moe::detail::require(!w.empty() && w.find_first_of(" \t\r\f\v") == std::string_view::npos, where, ": '", path,
                           "' line ", i + 1, " is '", w, "', expected one word per line, without spaces");
      const auto seen = vocab.ids_.find(std::string(w));
      moe::detail::require(seen == vocab.ids_.end(), where, ": '", path, "' line ", i + 1, ": '", w, "' repeats line ",
                           seen == vocab.ids_.end() ? 0 : seen->second + 1, ", expected each word once");
      vocab.add(std::string(w));
    }
    return vocab;
  }

 private:
  void add(std::string word) {
    ids_.emplace(word, size());
    words_.push_back(std::move(word));
  }

  std::vector<std::string> words_;
  std::unordered_map<std::string, Index> ids_;
};

// Windows of a token stream for truncated backpropagation through time. The stream is cut into
// `batch` contiguous streams of stream_length() = size / batch tokens each (the tail left over is
// dropped); window w covers positions p = w * steps ... p + steps of every stream, the inputs at
// p ... p + steps - 1 and the targets one later, so that a recurrent state carried from one window
// to the next reads each stream in order. An epoch has windows() = (stream_length() - 1) / steps
// windows.
class Batcher {
 public:
  Batcher(std::vector<Index> tokens, Index batch, Index steps)
      : tokens_(std::move(tokens)), batch_(batch), steps_(steps) {
    moe::detail::require(batch >= 1, "moe::lm::Batcher: batch = ", batch, ", expected at least 1");
    moe::detail::require(steps >= 1, "moe::lm::Batcher: steps = ", steps, ", expected at least 1");
    const Index size = static_cast<Index>(tokens_.size());
    length_ = size / batch;
    moe::detail::require(length_ >= steps + 1, "moe::lm::Batcher: ", size, " tokens cut into batch = ", batch,
                         " streams give ", length_, " tokens a stream, expected at least steps + 1 = ", steps + 1,
                         " (at least ", batch * (steps + 1), " tokens, or a smaller batch or steps)");
    tokens_.resize(static_cast<std::size_t>(batch * length_));
  }

  // Fills inputs and targets, each [steps x batch] row-major (time-major: row t holds the batch
  // streams at position() + t, the targets at position() + t + 1) and moves on by steps. Returns
  // false, leaving them alone, when the epoch is over (reset() starts the next).
  bool next(std::vector<Index>& inputs, std::vector<Index>& targets) {
    if (position_ + steps_ + 1 > length_) return false;
    const auto n = static_cast<std::size_t>(steps_ * batch_);
    inputs.resize(n);
    targets.resize(n);
    for (Index t = 0; t < steps_; ++t) {
      for (Index b = 0; b < batch_; ++b) {
        const auto at = static_cast<std::size_t>(b * length_ + position_ + t);
        const auto out = static_cast<std::size_t>(t * batch_ + b);
        inputs[out] = tokens_[at];
        targets[out] = tokens_[at + 1];
      }
    }
    position_ += steps_;
    return true;
  }

  // Where the next window starts in every stream: saved with a checkpoint, given to seek to resume.
  [[nodiscard]] Index position() const { return position_; }

  void seek(Index position) {
    moe::detail::require(position >= 0 && position <= length_, "moe::lm::Batcher::seek: position = ", position,
                         ", expected 0 <= position <= stream_length = ", length_,
                         " (a position() of a Batcher over the same tokens, batch and steps)");
    position_ = position;
  }

  void reset() { position_ = 0; }

  [[nodiscard]] Index batch() const { return batch_; }
  [[nodiscard]] Index steps() const { return steps_; }
  [[nodiscard]] Index stream_length() const { return length_; }
  [[nodiscard]] Index windows() const { return (length_ - 1) / steps_; }

 private:
  std::vector<Index> tokens_;
  Index batch_, steps_, length_ = 0, position_ = 0;
};

}  // namespace moe::lm
