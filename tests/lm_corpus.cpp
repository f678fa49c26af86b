// The language-model demo's data: tokenization, the KJV and plain readers, the splits, the
// vocabulary and the batches (examples/lm/corpus.hpp).
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "../examples/lm/corpus.hpp"
#include "support.hpp"

namespace {

using moe::Index;
using moe::test::contains;
using moe::test::error_of;
using Words = std::vector<std::string>;
namespace fs = std::filesystem;
namespace lm = moe::lm;

// A fresh directory under the system's temp dir, removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() / ("moe-lm-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  [[nodiscard]] std::string write(const std::string& name, const std::string& text) const {
    const fs::path p = path / name;
    std::ofstream(p, std::ios::binary) << text;
    return p.string();
  }
};

// Three books, two chapters each, in the format of `bible`: a verse wraps onto the next line, and
// one wrapped line ends in a number without being a chapter header.
const char* const kSmallKjv =
    "\n"
    "Genesis 1\n"
    "\n"
    "  1 In the beginning God created the heaven and the earth.\n"
    "  2 And the LORD's Spirit moved upon the\n"
    "waters 40\n"
    "\n"
    "Genesis 2\n"
    "\n"
    "  1 Thus the heavens were finished.\n"
    "\n"
    "1 Samuel 1\n"
    "\n"
    "  1 Now there was a certain man; his name was Elkanah:\n"
    "  2 And he had two wives.\n"
    "\n"
    "1 Samuel 2\n"
    "\n"
    "  1 And Hannah prayed, and said, My heart rejoiceth!\n"
    "\n"
    "Song of Solomon 1\n"
    "\n"
    "  1 The song of songs, which is Solomon's.\n"
    "\n"
    "Song of Solomon 2\n"
    "\n"
    "  1 I am the rose of Sharon?\n";

Words concat(std::initializer_list<Words> parts) {
  Words out;
  for (const Words& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

std::size_t count_of(const Words& words, const std::string& w) {
  return static_cast<std::size_t>(std::count(words.begin(), words.end(), w));
}

}  // namespace

TEST_CASE("lm tokenize: lowercase words, inner apostrophes, digit runs and the six marks") {
  CHECK(lm::tokenize("The LORD's house, 12 cubits; (and) sons' 'tis don't!") ==
        Words{"the", "lord's", "house", ",", "12", "cubits", ";", "and", "sons", "tis", "don't", "!"});
  CHECK(lm::tokenize("a''b x-ray 3.14 r2d2 Why? Yes: no.") ==
        Words{"a", "b", "x", "ray", "3", ".", "14", "r", "2", "d", "2", "why", "?", "yes", ":", "no", "."});
  CHECK(lm::tokenize("caf\xc3\xa9 line\r\nnext\t\"quoted\" <eos>") == Words{"caf", "line", "next", "quoted", "eos"});
  CHECK(lm::tokenize(" -- () ' ").empty());
}

TEST_CASE("lm read_words: a file's words, and errors naming the file") {
  TempDir dir;
  CHECK(lm::read_words(dir.write("two.txt", "Hello,\n\nWORLD")) == Words{"hello", ",", "world"});

  const std::string missing = (dir.path / "missing.txt").string();
  std::string e = error_of([&] { (void)lm::read_words(missing); });
  CHECK(contains(e, "moe::lm::read_words: '" + missing + "' does not exist, expected a text file"));
  e = error_of([&] { (void)lm::read_words(dir.path.string()); });
  CHECK(contains(e, "is a directory, expected a text file"));
  const std::string empty = dir.write("empty.txt", "");
  e = error_of([&] { (void)lm::read_words(empty); });
  CHECK(contains(e, "'" + empty + "' holds no words, expected a text of at least 2 words"));
  const std::string dashes = dir.write("dashes.txt", "-- ( ) --\n");
  CHECK(contains(error_of([&] { (void)lm::read_words(dashes); }), "holds no words"));
  const std::string one = dir.write("one.txt", "  Amen  \n");
  e = error_of([&] { (void)lm::read_words(one); });
  CHECK(contains(e, "'" + one + "' holds a single word ('amen'), expected a text of at least 2 words"));
}

TEST_CASE("lm read_kjv: one document per book, verse numbers and headers dropped, <eos> after each verse") {
  TempDir dir;
  const std::string path = dir.write("small.txt", kSmallKjv);
  CHECK(lm::is_kjv(path));
  const auto books = lm::read_kjv(path);
  REQUIRE(books.size() == 3);
  CHECK(books[0].title == "Genesis");
  CHECK(books[1].title == "1 Samuel");
  CHECK(books[2].title == "Song of Solomon");
  CHECK(books[0].words == Words{"in",      "the",   "beginning", "god",    "created", "the",   "heaven", "and",
                                "the",     "earth", ".",         "<eos>",  "and",     "the",   "lord's", "spirit",
                                "moved",   "upon",  "the",       "waters", "40",      "<eos>", "thus",   "the",
                                "heavens", "were",  "finished",  ".",      "<eos>"});
  CHECK(books[1].words == Words{"now",  "there", "was",     "a",     "certain", "man",       ";",      "his",
                                "name", "was",   "elkanah", ":",     "<eos>",   "and",       "he",     "had",
                                "two",  "wives", ".",       "<eos>", "and",     "hannah",    "prayed", ",",
                                "and",  "said",  ",",       "my",    "heart",   "rejoiceth", "!",      "<eos>"});
  CHECK(books[2].words == Words{"the", "song", "of", "songs", ",", "which", "is", "solomon's", ".", "<eos>", "i", "am",
                                "the", "rose", "of", "sharon", "?", "<eos>"});

  // Three books are too few for the split by book.
  const std::string e = error_of([&] { (void)lm::split_kjv(books); });
  CHECK(contains(e, "moe::lm::split_kjv: 3 books give train 79, valid 0 and test 0 words"));
  CHECK(contains(e, "the corpus is too small: expected at least 6 books"));
  // read_split takes the same path for it.
  CHECK(contains(error_of([&] { (void)lm::read_split(path); }), "moe::lm::split_kjv: 3 books"));
}

TEST_CASE("lm read_kjv: detection and malformed files") {
  TempDir dir;
  CHECK_FALSE(lm::is_kjv(dir.write("plain.txt", "\n\nGenesis\n  1 In the beginning\n")));
  CHECK_FALSE(lm::is_kjv(dir.write("exodus.txt", "Exodus 1\n\n  1 Now these\n")));
  CHECK_FALSE(lm::is_kjv((dir.path / "missing.txt").string()));
  CHECK(lm::is_kjv(dir.write("crlf.txt", " \r\n\r\nGenesis 1\r\n\r\n  1 In the beginning\r\n")));
  CHECK(lm::read_kjv((dir.path / "crlf.txt").string())[0].words == Words{"in", "the", "beginning", "<eos>"});

  const std::string plain = dir.write("story.txt", "Once upon a time.\n");
  CHECK(contains(error_of([&] { (void)lm::read_kjv(plain); }),
                 "moe::lm::read_kjv: '" + plain + "' line 1: 'Once upon a time.' is neither a chapter header"));
  const std::string blank = dir.write("blank.txt", "\n\n");
  CHECK(contains(error_of([&] { (void)lm::read_kjv(blank); }), "'" + blank + "' has no chapter header"));
  const std::string early = dir.write("early.txt", "  1 In the beginning\nGenesis 1\n");
  CHECK(contains(error_of([&] { (void)lm::read_kjv(early); }), "line 1: a verse before the first chapter header"));
  const std::string again = dir.write("again.txt", "Genesis 1\n\n  1 a\n\nExodus 1\n\n  1 b\n\nGenesis 2\n\n  1 c\n");
  CHECK(
      contains(error_of([&] { (void)lm::read_kjv(again); }),
               "line 9: book 'Genesis' appears again after 'Exodus', expected each book's chapters one after another"));
  const std::string empty_book = dir.write("empty_book.txt", "Genesis 1\n\nExodus 1\n\n  1 b\n");
  CHECK(contains(error_of([&] { (void)lm::read_kjv(empty_book); }), "line 3: book 'Genesis' has no verses"));
  const std::string empty_last = dir.write("empty_last.txt", "Genesis 1\n\n  1 a\n\nExodus 1\n");
  CHECK(contains(error_of([&] { (void)lm::read_kjv(empty_last); }), "book 'Exodus' has no verses"));
  const std::string orphan = dir.write("orphan.txt", "Genesis 1\n\n  1 a\n\nwrapped text\n");
  CHECK(contains(error_of([&] { (void)lm::read_kjv(orphan); }), "line 5: 'wrapped text' is neither a chapter header"));
}

TEST_CASE("lm split_kjv: by book index, i % 12 == 5 test, i % 12 == 3 valid, the rest train, in order") {
  std::vector<lm::Document> books;
  for (int i = 0; i < 18; ++i) books.push_back({"book " + std::to_string(i), {"w" + std::to_string(i), "<eos>"}});
  const auto split = lm::split_kjv(books);
  CHECK(split.valid == Words{"w3", "<eos>", "w15", "<eos>"});
  CHECK(split.test == Words{"w5", "<eos>", "w17", "<eos>"});
  Words train;
  for (int i : {0, 1, 2, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16})
    train.insert(train.end(), {"w" + std::to_string(i), "<eos>"});
  CHECK(split.train == train);

  std::vector<lm::Document> six(books.begin(), books.begin() + 6), five(books.begin(), books.begin() + 5);
  CHECK(lm::split_kjv(six).test == Words{"w5", "<eos>"});
  CHECK(contains(error_of([&] { (void)lm::split_kjv(five); }),
                 "5 books give train 8, valid 2 and test 0 words; the corpus is too small: expected at least 6 books"));
  six[3].words.clear();
  CHECK(contains(error_of([&] { (void)lm::split_kjv(six); }), "6 books give train 8, valid 0 and test 2 words"));
}

TEST_CASE("lm read_plain and split_plain: <eos> at paragraph ends, 80/10/10 cut at paragraph ends nearby") {
  TempDir dir;
  const std::string path = dir.write("story.txt", "\nOnce upon a time,\nthere was a king.\n\n\n  \nThe end\n");
  const auto doc = lm::read_plain(path);
  CHECK(doc.title == "story.txt");
  CHECK(doc.words ==
        Words{"once", "upon", "a", "time", ",", "there", "was", "a", "king", ".", "<eos>", "the", "end", "<eos>"});
  CHECK_FALSE(lm::is_kjv(path));

  // Paragraphs of 7 words (the 7th an <eos>): 80 % of 100 is 80, the nearest paragraph end 77;
  // 90 % is 90, the nearest 91.
  lm::Document paragraphs{"p", {}};
  for (int i = 0; i < 100; ++i) paragraphs.words.push_back(i % 7 == 6 ? "<eos>" : "w" + std::to_string(i));
  auto split = lm::split_plain(paragraphs);
  CHECK(split.train.size() == 77);
  CHECK(split.valid.size() == 14);
  CHECK(split.test.size() == 9);
  CHECK(split.train.back() == "<eos>");
  CHECK(split.valid.back() == "<eos>");
  CHECK(concat({split.train, split.valid, split.test}) == paragraphs.words);

  // No paragraph end within 5 % of a cut: it stays where it falls.
  lm::Document one{"one", Words(99, "w")};
  one.words.push_back("<eos>");
  split = lm::split_plain(one);
  CHECK(split.train.size() == 80);
  CHECK(split.valid.size() == 10);
  CHECK(split.test.size() == 10);

  // The smallest corpus: 10 words, 8 / 1 / 1.
  lm::Document ten{"ten", Words(10, "w")};
  split = lm::split_plain(ten);
  CHECK(split.train.size() == 8);
  CHECK(split.valid.size() == 1);
  CHECK(split.test.size() == 1);
  ten.words.pop_back();
  CHECK(contains(error_of([&] { (void)lm::split_plain(ten); }),
                 "moe::lm::split_plain: 'ten' has 9 words (<eos> marks included); the corpus is too small: expected "
                 "at least 10"));

  const std::string small = dir.write("small.txt", "a b c\n\nd\n");
  CHECK(contains(error_of([&] { (void)lm::read_split(small); }), "'small.txt' has 6 words"));
  const std::string empty = dir.write("empty.txt", "\n\n");
  CHECK(
      contains(error_of([&] { (void)lm::read_plain(empty); }), "moe::lm::read_plain: '" + empty + "' holds no words"));
  const std::string one_word = dir.write("one.txt", "\nAmen\n\n");
  CHECK(contains(error_of([&] { (void)lm::read_plain(one_word); }), "holds a single word ('amen')"));
  CHECK(contains(error_of([&] { (void)lm::read_split((dir.path / "nope.txt").string()); }),
                 "moe::lm::read_plain: '" + (dir.path / "nope.txt").string() + "' does not exist"));
}

TEST_CASE("lm Vocabulary: most frequent first, ties alphabetical, <unk> 0 and <eos> 1") {
  const Words train{"b", "a", "c", "a", "<eos>", "b", "d", "c", "<eos>", "<eos>", "<unk>", "e", "e", "e"};
  const lm::Vocabulary v(train, 5);
  REQUIRE(v.size() == 5);
  CHECK(v.word(0) == "<unk>");
  CHECK(v.word(1) == "<eos>");
  CHECK(v.word(2) == "e");
  CHECK(v.word(3) == "a");
  CHECK(v.word(4) == "b");
  CHECK(v.id("e") == 2);
  CHECK(v.id("b") == 4);
  CHECK(v.id("<eos>") == lm::Vocabulary::kEosId);
  CHECK(v.id("c") == lm::Vocabulary::kUnkId);
  CHECK(v.id("zebra") == 0);
  CHECK(v.encode({"a", "zebra", "<eos>", "e", "c"}) == std::vector<Index>{3, 0, 1, 2, 0});
  CHECK(contains(error_of([&] { (void)v.word(5); }), "moe::lm::Vocabulary::word: id = 5, expected 0 <= id < size = 5"));
  CHECK(contains(error_of([&] { (void)v.word(-1); }), "id = -1"));

  const lm::Vocabulary all(train, 100);
  CHECK(all.size() == 7);
  CHECK(all.word(5) == "c");
  CHECK(all.word(6) == "d");
  CHECK(lm::Vocabulary(train, 2).size() == 2);
  CHECK(contains(error_of([&] { lm::Vocabulary(train, 1); }),
                 "moe::lm::Vocabulary: max_size = 1, expected at least 2 (<unk> and <eos>)"));
}

TEST_CASE("lm Vocabulary: save and load round trip, corrupt files rejected") {
  TempDir dir;
  const lm::Vocabulary v(Words{"in", "the", "beginning", "the", "lord's", "the", "in"}, 100);
  const std::string path = (dir.path / "vocab.txt").string();
  v.save(path);
  {
    std::ifstream in(path);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    CHECK(text == "<unk>\n<eos>\nthe\nin\nbeginning\nlord's\n");
  }
  const auto loaded = lm::Vocabulary::load(path);
  REQUIRE(loaded.size() == v.size());
  for (Index i = 0; i < v.size(); ++i) CHECK(loaded.word(i) == v.word(i));
  CHECK(loaded.id("lord's") == 5);
  CHECK(loaded.id("earth") == 0);
  CHECK(lm::Vocabulary::load(dir.write("bare.txt", "<unk>\n<eos>")).size() == 2);

  const std::string dup = dir.write("dup.txt", "<unk>\n<eos>\nthe\nin\nthe\n");
  CHECK(contains(error_of([&] { (void)lm::Vocabulary::load(dup); }),
                 "moe::lm::Vocabulary::load: '" + dup + "' line 5: 'the' repeats line 3, expected each word once"));
  const std::string eos_again = dir.write("eos_again.txt", "<unk>\n<eos>\n<eos>\n");
  CHECK(contains(error_of([&] { (void)lm::Vocabulary::load(eos_again); }), "line 3: '<eos>' repeats line 2"));
  const std::string order = dir.write("order.txt", "<eos>\n<unk>\nthe\n");
  CHECK(contains(error_of([&] { (void)lm::Vocabulary::load(order); }),
                 "'" + order + "' starts with '<eos>', '<unk>', expected '<unk>' and '<eos>' on its first two lines"));
  const std::string blank = dir.write("blank.txt", "<unk>\n<eos>\nthe\n\nin\n");
  CHECK(contains(error_of([&] { (void)lm::Vocabulary::load(blank); }),
                 "line 4 is '', expected one word per line, without spaces"));
  const std::string spaced = dir.write("spaced.txt", "<unk>\n<eos>\nthe lord\n");
  CHECK(contains(error_of([&] { (void)lm::Vocabulary::load(spaced); }), "line 3 is 'the lord'"));
  CHECK(contains(error_of([&] { (void)lm::Vocabulary::load(dir.write("empty.txt", "")); }), "starts with '', ''"));
  CHECK(contains(error_of([&] { (void)lm::Vocabulary::load((dir.path / "none.txt").string()); }),
                 "moe::lm::Vocabulary::load: '" + (dir.path / "none.txt").string() + "' does not exist"));
}

TEST_CASE("lm Batcher: time-major windows over contiguous streams, resumable") {
  std::vector<Index> stream(23);
  std::iota(stream.begin(), stream.end(), Index{0});
  // batch 2: streams 0..10 and 11..21 (22 dropped); steps 3: windows at 0, 3, 6.
  lm::Batcher batches(stream, 2, 3);
  CHECK(batches.stream_length() == 11);
  CHECK(batches.windows() == 3);
  std::vector<Index> x, y;
  REQUIRE(batches.next(x, y));
  CHECK(x == std::vector<Index>{0, 11, 1, 12, 2, 13});
  CHECK(y == std::vector<Index>{1, 12, 2, 13, 3, 14});
  CHECK(batches.position() == 3);
  REQUIRE(batches.next(x, y));
  CHECK(x == std::vector<Index>{3, 14, 4, 15, 5, 16});
  CHECK(y == std::vector<Index>{4, 15, 5, 16, 6, 17});
  const Index saved = batches.position();
  REQUIRE(batches.next(x, y));
  CHECK(x == std::vector<Index>{6, 17, 7, 18, 8, 19});
  CHECK(y == std::vector<Index>{7, 18, 8, 19, 9, 20});
  CHECK_FALSE(batches.next(x, y));
  CHECK(x == std::vector<Index>{6, 17, 7, 18, 8, 19});  // left alone
  CHECK_FALSE(batches.next(x, y));

  // A fresh Batcher sought to a saved position gives the same next windows.
  lm::Batcher resumed(stream, 2, 3);
  resumed.seek(saved);
  std::vector<Index> rx, ry;
  REQUIRE(resumed.next(rx, ry));
  CHECK(rx == x);
  CHECK(ry == y);
  CHECK_FALSE(resumed.next(rx, ry));

  batches.reset();
  REQUIRE(batches.next(x, y));
  CHECK(x == std::vector<Index>{0, 11, 1, 12, 2, 13});

  // One stream, one step: every consecutive pair.
  lm::Batcher pairs({5, 6, 7}, 1, 1);
  std::vector<std::vector<Index>> seen;
  while (pairs.next(x, y)) seen.push_back({x[0], y[0]});
  CHECK(seen == std::vector<std::vector<Index>>{{5, 6}, {6, 7}});

  CHECK(contains(error_of([&] { resumed.seek(12); }),
                 "moe::lm::Batcher::seek: position = 12, expected 0 <= position <= stream_length = 11"));
  CHECK(contains(error_of([&] { resumed.seek(-1); }), "position = -1"));
  CHECK(contains(error_of([&] { lm::Batcher(std::vector<Index>(7), 2, 3); }),
                 "moe::lm::Batcher: 7 tokens cut into batch = 2 streams give 3 tokens a stream, expected at least "
                 "steps + 1 = 4 (at least 8 tokens"));
  CHECK_NOTHROW(lm::Batcher(std::vector<Index>(8), 2, 3));
  CHECK(contains(error_of([&] { lm::Batcher(stream, 0, 3); }), "batch = 0, expected at least 1"));
  CHECK(contains(error_of([&] { lm::Batcher(stream, 2, 0); }), "steps = 0, expected at least 1"));
}

TEST_CASE("lm get-kjv and the real King James Bible: 66 books, the split about 80/10/10") {
  const fs::path script = fs::path(__FILE__).parent_path() / ".." / "examples" / "lm" / "get-kjv";
  const bool have_script = fs::exists(script);
  TempDir dir;
  if (have_script) {
    // Without `bible` on the PATH the script says what to install and writes nothing.
    const std::string out = (dir.path / "none.txt").string(), err = (dir.path / "err.txt").string();
    const int status =
        std::system(("PATH=/nonexistent /bin/bash '" + script.string() + "' '" + out + "' 2>'" + err + "'").c_str());
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 1);
    CHECK_FALSE(fs::exists(out));
    std::ifstream in(err);
    const std::string message((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    CHECK(contains(message, "install the Debian package bible-kjv, e.g. with scripts/install-deps"));
  } else {
    MESSAGE("examples/lm/get-kjv not found at " << script.string() << ": its checks are skipped");
  }
  if (!fs::exists("/usr/bin/bible")) {
    MESSAGE("/usr/bin/bible not found (Debian package bible-kjv): the real KJV checks are skipped");
    return;
  }
  const std::string path = (dir.path / "kjv.txt").string();
  const std::string command =
      have_script ? "'" + script.string() + "' '" + path + "' >/dev/null" : "bible 'Gen1:1-Rev22:21' > '" + path + "'";
  REQUIRE(std::system(command.c_str()) == 0);
  if (have_script) {
    std::set<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir.path)) names.insert(entry.path().filename().string());
    CHECK(names == std::set<std::string>{"err.txt", "kjv.txt"});  // no temporary file left behind
  }

  REQUIRE(lm::is_kjv(path));
  const auto books = lm::read_kjv(path);
  REQUIRE(books.size() == 66);
  CHECK(books[0].title == "Genesis");
  CHECK(books[21].title == "Song of Solomon");
  CHECK(books[8].title == "1 Samuel");
  CHECK(books[65].title == "Revelation");
  std::size_t words = 0, verses = 0;
  for (const auto& b : books) {
    words += b.words.size();
    verses += count_of(b.words, "<eos>");
    CHECK(b.words.back() == "<eos>");
  }
  CHECK(verses == 31102);
  CHECK(words > 800000);
  CHECK(words < 1100000);
  CHECK(books[0].words[0] == "in");
  CHECK(count_of(books[0].words, "1") == 0);  // no verse numbers

  const auto split = lm::split_kjv(books);
  const double n = static_cast<double>(words);
  const double train = static_cast<double>(split.train.size()) / n, valid = static_cast<double>(split.valid.size()) / n,
               test = static_cast<double>(split.test.size()) / n;
  MESSAGE("KJV: " << words << " words, train " << split.train.size() << ", valid " << split.valid.size() << ", test "
                  << split.test.size());
  CHECK(split.train.size() + split.valid.size() + split.test.size() == words);
  CHECK(train > 0.70);
  CHECK(train < 0.90);
  CHECK(valid > 0.05);
  CHECK(valid < 0.15);
  CHECK(test > 0.05);
  CHECK(test < 0.15);
  CHECK(split.test.front() == books[5].words.front());   // Joshua opens test
  CHECK(split.valid.front() == books[3].words.front());  // Numbers opens valid

  const lm::Vocabulary all(split.train, 1 << 30);
  std::set<std::string> distinct;
  for (const auto& b : books) distinct.insert(b.words.begin(), b.words.end());
  MESSAGE("KJV: " << distinct.size() - 1 << " distinct words (<eos> aside), " << all.size() - 2 << " in train");
  CHECK(all.size() > 10000);
  const lm::Vocabulary v(split.train, 10000);
  CHECK(v.size() == 10000);
  CHECK(v.word(2) == ",");
  CHECK(v.word(3) == "the");
  const auto ids = v.encode(split.test);
  const auto unknown = static_cast<double>(std::count(ids.begin(), ids.end(), Index{0}));
  CHECK(unknown / static_cast<double>(ids.size()) < 0.02);
  CHECK(unknown > 0);
}
