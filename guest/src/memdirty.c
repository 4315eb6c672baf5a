/* memdirty:mib=N,rate=PAGES_PER_S|max,bytes=B,verify=SECS,pattern=random|text|sparse|partial,words=W,hot=H,hotpct=P,
 *          burst_on_ms=ON,burst_off_ms=OFF
 * Dirties pages at a steady rate (or in bursts: ON ms at the rate, then OFF ms without a single write, repeated) with a verifiable pattern (see guest/README.md for the exact definitions):
 *   random  page p at generation g holds  PRNG(p,g)[0:B] ++ PRNG(p,0)[B:4096]   (incompressible; the default)
 *   text    page p at generation g holds  Text(p,g)[0:B] ++ Text(p,0)[B:4096]   (compresses like real text)
 *   sparse  Text(p,0) with W scattered 8-byte words rewritten per generation    (a delta of W*8 bytes)
 *   partial each dirtying writes one byte range at an odd offset, of any length, across the boundary of pages p and p+1
 * where PRNG(p,g) is the splitmix64 word stream seeded with seed(p,g) and Text(p,g) is a sequence of text chunks
 * that the same stream picks. hot=H sends hotpct% of the writes to the first H MiB. gen[] lives in guest memory
 * too, so a migration that loses or reorders any page write is detected by the verifier. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "common.h"

#define PAGE 4096
#define PWORDS (PAGE / 8)
static volatile sig_atomic_t verify_now;
static void on_usr1(int s) { (void)s; verify_now = 1; }

static uint64_t seed_of(uint64_t p, uint64_t g) { return (p * 0x9E3779B97F4A7C15ull) ^ (g * 0xD1B54A32D192ED03ull) ^ 0x5EEDF00Dull; }

static void fill(uint64_t *dst, uint64_t p, uint64_t g, size_t words) {
  uint64_t s = seed_of(p, g);
  for (size_t i = 0; i < words; i++) dst[i] = splitmix64(&s);
}

/* ---- pattern=text ----
 * Text(p,g) is a sequence of 8-byte chunks from a fixed table of 2048 that text_init() packs from the vocabulary
 * below (whole words with their separators, padded with spaces), so pages read like text, logs or string-heavy
 * heap. Each splitmix64 word of seed(p,g) picks 5 chunks with its low 55 bits, 11 bits each (low bits first).
 * That is one load and one store per 8 bytes, no dearer than the PRNG fill. 128 MiB of it compresses 3.8x with
 * zstd -1 and 2.15x with lz4 (between English prose and C source). Words picked one at a time compress far worse
 * (zstd -1 2.3x, lz4 1.7x: LZ finds no phrases) and cost 3x the CPU; the recurring chunks stand in for phrases. */
static const char *const vocab[] = {
    "the", "of", "and", "to", "a", "in", "is", "0", "it", "for", "that", "1", "on", "if", "NULL", "int", "i",
    "x", "=", "==", "return", "->", "you", "he", "was", "are", "as", "with", "his", "they", "at", "be", "this",
    "have", "from", "or", "one", "had", "by", "word", "but", "not", "what", "all", "were", "we", "when", "your",
    "can", "said", "there", "use", "an", "each", "which", "she", "do", "how", "their", "will", "up", "other",
    "char", "void", "struct", "static", "const", "else", "while", "size_t", "u64", "u32", "ptr", "len",
    "about", "out", "many", "then", "them", "these", "so", "some", "her", "would", "make", "like", "him", "into",
    "size", "buf", "data", "next", "prev", "node", "list", "key", "value", "count", "index", "flags", "state",
    "time", "has", "look", "two", "more", "write", "go", "see", "number", "no", "way", "could", "people", "my",
    "lock", "free", "alloc", "error", "err", "ret", "fd", "addr", "offset", "cpu", "task", "inode", "file",
    "than", "first", "water", "been", "call", "who", "its", "now", "find", "long", "down", "day", "did", "get",
    "dev", "irq", "user", "kernel", "true", "false", "self", "id", "type", "2", "4", "8", "16", "32", "64",
    "come", "made", "may", "part", "over", "new", "sound", "take", "only", "little", "work", "know", "place",
    "100", "128", "255", "1024", "4096", "0x0", "0xff", "0x1000", "-1", "ok", "INFO", "WARN", "[0]",
    "year", "live", "me", "back", "give", "most", "very", "after", "thing", "our", "just", "name", "good",
    "should", "man", "think", "say", "great", "where", "help", "through", "much", "before", "line", "right",
    "too", "mean", "old", "any", "same", "tell", "follow", "came", "want", "show", "also", "around", "form",
    "three", "small", "set", "put", "end", "does", "another", "well", "large", "must", "big", "even", "such",
    "because", "turn", "here", "why", "ask", "went", "read", "need", "land", "home", "move", "try", "kind",
    "hand", "again", "change", "off", "play", "away", "house", "point", "page", "letter", "answer", "found",
    "still", "learn", "world", "high", "every", "near", "add", "own", "below", "country", "last", "school",
    "keep", "never", "start", "city", "light", "thought", "head", "under", "story", "left", "few",
};
#define CHUNK_BITS 11
#define CHUNKS (1u << CHUNK_BITS)
#define PICKS_PER_WORD (64 / CHUNK_BITS)
static uint64_t chunks[CHUNKS]; /* little-endian: the chunk's first byte is the lowest */

/* Token k of the vocabulary stream: with r the k-th splitmix64 output of seed 0x7E47, vocab[(r mod 2^32) mod n]
 * followed by " " (70%), ", " (12%), ".\n" (10%) or "\n" (8%) chosen by (r >> 32) mod 100; " " instead when the
 * word and its separator would not fit in 8 bytes. Returns the length (at most 8). */
static int next_token(uint64_t *s, char tok[16]) {
  uint64_t r = splitmix64(s), pct = (r >> 32) % 100;
  const char *w = vocab[(r & 0xffffffffu) % (sizeof vocab / sizeof *vocab)];
  const char *sep = pct < 70 ? " " : pct < 82 ? ", " : pct < 92 ? ".\n" : "\n";
  int n = snprintf(tok, 16, "%s%s", w, sep);
  return n <= 8 ? n : snprintf(tok, 16, "%s ", w);
}

/* Chunk i: tokens from the stream are appended while they fit; a token that does not fit is dropped, and after 2
 * such misses (or at exactly 8 bytes) the rest of the chunk is spaces. */
static void text_init(void) {
  uint64_t s = 0x7E47;
  for (size_t i = 0; i < CHUNKS; i++) {
    char c[8], tok[16];
    memset(c, ' ', sizeof c);
    for (int have = 0, misses = 0; have < 8 && misses < 2;) {
      int n = next_token(&s, tok);
      if (have + n <= 8) { memcpy(c + have, tok, (size_t)n); have += n; }
      else misses++;
    }
    uint64_t v = 0;
    for (int k = 7; k >= 0; k--) v = v << 8 | (unsigned char)c[k];
    chunks[i] = v;
  }
}

/* Writes the first `words` words of Text(p,g). */
static void text_fill(uint64_t *dst, uint64_t p, uint64_t g, size_t words) {
  uint64_t s = seed_of(p, g);
  for (size_t i = 0; i < words;) {
    uint64_t r = splitmix64(&s);
    for (int k = 0; k < PICKS_PER_WORD && i < words; k++, r >>= CHUNK_BITS) dst[i++] = chunks[r & (CHUNKS - 1)];
  }
}

/* ---- pattern=sparse ----
 * The word writes to page p are numbered t = 0,1,2,...; generation g makes writes (g-1)*W .. g*W-1. Write t stores
 * sparse_value(p,t) at word ((t mod 512) * 37) mod 512: 37 is odd, so 512 consecutive writes visit every word once.
 * The newest write to word w before generation g ends is t = j + 512*floor((g*W-1-j)/512) with j = w*429 mod 512
 * (429 = 37^-1 mod 512), if j < g*W; otherwise w still holds Text(p,0). So verifying costs O(512) per page. */
#define SPARSE_STEP 37u
/* A text chunk, so the page keeps looking like text (a few fields of a struct changed) however often it is
 * written: the data stays as compressible as at the start, only the delta is small. */
static uint64_t sparse_value(uint64_t p, uint64_t t) {
  uint64_t s = seed_of(p, t) ^ 0x5350415253450000ull;
  return chunks[splitmix64(&s) & (CHUNKS - 1)];
}

static void sparse_write(uint64_t *pg, uint64_t p, uint64_t g, uint64_t w) {
  for (uint64_t t = (g - 1) * w; t < g * w; t++) pg[((t % PWORDS) * SPARSE_STEP) % PWORDS] = sparse_value(p, t);
}

/* Applies the newest write of every word (same result as replaying generations 1..g with sparse_write). */
static void sparse_apply(uint64_t *pg, uint64_t p, uint64_t g, uint64_t w) {
  uint64_t total = g * w;
  for (uint64_t j = 0; j < PWORDS && j < total; j++)
    pg[(j * SPARSE_STEP) % PWORDS] = sparse_value(p, j + (total - 1 - j) / PWORDS * PWORDS);
}

/* ---- pattern=partial ----
 * Sub-page writes that cross page boundaries. The set has one page more than its slots; slot p owns the 4096-byte
 * window from byte 2048 of page p to byte 2048 of page p+1 (the first half of page 0 and the last half of the extra
 * page stay zero). Generation g of slot p writes the window's bytes [a, b) with a = 1 + 2*(r mod 1024) (odd, 1..2047)
 * and b = 2049 + ((r >> 32) mod 2047) (2049..4095: any parity, so any length parity), r = the first splitmix64 output
 * for seed(p,g) ^ 0x5041525449414C00: every write starts at an odd byte, covers the page boundary (window byte 2048)
 * and is not word-aligned at either end. Window byte i at generation g is byte (i mod 8) (little-endian) of
 * partial_word(p,g,i/8) = the first splitmix64 output for seed(p,g) ^ (i/8); generation 0 fills the whole window.
 * Because every range contains byte 2048, the bytes written by generations g..G form one interval, so the expected
 * window is built walking back from G: O(G + 4096) per slot. */
#define PARTIAL_SALT 0x5041525449414C00ull
static uint64_t partial_word(uint64_t p, uint64_t g, uint64_t k) {
  uint64_t s = seed_of(p, g) ^ k;
  return splitmix64(&s);
}
static void partial_range(uint64_t p, uint64_t g, size_t *a, size_t *b) {
  uint64_t s = seed_of(p, g) ^ PARTIAL_SALT, r = splitmix64(&s);
  *a = 1 + 2 * (size_t)((r & 0xffffffffu) % 1024);
  *b = 2049 + (size_t)((r >> 32) % 2047);
}
/* Writes generation g's bytes [a, b) of slot p's window `w`, one splitmix64 per 8 bytes, byte by byte. */
static void partial_fill(uint8_t *w, uint64_t p, uint64_t g, size_t a, size_t b) {
  for (size_t k = a / 8; k * 8 < b; k++) {
    uint64_t v = partial_word(p, g, k);
    for (size_t i = k * 8 > a ? k * 8 : a; i < (k + 1) * 8 && i < b; i++) w[i] = (uint8_t)(v >> (8 * (i % 8)));
  }
}
/* The guest's write of generation g: misaligned 8-byte stores (`sd` at odd addresses, which the CPU performs; the
 * one around window byte 2048 straddles the page boundary), then the last b-a mod 8 bytes one by one. */
static void partial_write(uint64_t *pg, uint64_t p, uint64_t g) {
  size_t a, b, i;
  partial_range(p, g, &a, &b);
  uint8_t *w = (uint8_t *)pg + PAGE / 2;
  for (i = a; i + 8 <= b; i += 8) {
    const unsigned shift = 8 * (unsigned)(i % 8); /* never 0: i is odd */
    const uint64_t v = partial_word(p, g, i / 8) >> shift | partial_word(p, g, i / 8 + 1) << (64 - shift);
#if defined(__riscv)
    __asm__ volatile("sd %1, 0(%0)" : : "r"(w + i), "r"(v) : "memory");
#else
    memcpy(w + i, &v, 8);
#endif
  }
  partial_fill(w, p, g, i, b);
}
/* What slot p's window must hold at generation G. */
static void partial_expected(uint8_t *w, uint64_t p, uint64_t G) {
  size_t lo = 2048, hi = 2048;
  for (uint64_t g = G; g >= 1; g--) {
    size_t a, b;
    partial_range(p, g, &a, &b);
    if (a < lo) { partial_fill(w, p, g, a, lo); lo = a; }
    if (b > hi) { partial_fill(w, p, g, hi, b); hi = b; }
  }
  partial_fill(w, p, 0, 0, lo);
  partial_fill(w, p, 0, hi, PAGE);
}

/* ---- the working set ---- */
enum pattern { PAT_RANDOM, PAT_TEXT, PAT_SPARSE, PAT_PARTIAL };
static const char *const pattern_name[] = {"random", "text", "sparse", "partial"};

struct set {
  enum pattern pat;
  uint64_t *mem;
  uint32_t *gen;
  size_t pages, hot_pages, bwords, words;
  unsigned hotpct;
};

/* Generation 0 of page p. */
static void base_page(const struct set *s, uint64_t *pg, size_t p) {
  if (s->pat == PAT_RANDOM) fill(pg, p, 0, PWORDS);
  else if (s->pat == PAT_PARTIAL) partial_fill((uint8_t *)pg + PAGE / 2, p, 0, 0, PAGE);  /* slot p's window */
  else text_fill(pg, p, 0, PWORDS);
}

/* Turns page p from generation g-1 into generation g (g >= 1). */
static void dirty_page(const struct set *s, uint64_t *pg, size_t p, uint32_t g) {
  switch (s->pat) {
    case PAT_RANDOM: fill(pg, p, g, s->bwords); break;
    case PAT_TEXT: text_fill(pg, p, g, s->bwords); break;
    case PAT_SPARSE: sparse_write(pg, p, g, s->words); break;
    case PAT_PARTIAL: partial_write(pg, p, g); break;
  }
}

/* What page p must hold at generation g, built from scratch: random and text pages only keep the newest
 * generation's prefix; sparse applies each word's newest write instead of replaying all generations. */
static void expected_page(const struct set *s, uint64_t *pg, size_t p, uint32_t g) {
  base_page(s, pg, p);
  if (g == 0) return;
  if (s->pat == PAT_SPARSE) sparse_apply(pg, p, g, s->words);
  else dirty_page(s, pg, p, g);
}

/* The page to dirty next: uniform over the set, or hotpct% uniform over the hot pages and the rest uniform over the
 * cold ones. hot=0 keeps the exact draw sequence of the original memdirty. */
static size_t pick_page(const struct set *s, uint64_t *rng) {
  uint64_t r = splitmix64(rng);
  if (!s->hot_pages) return (size_t)(r % s->pages);
  uint64_t at = r >> 32;
  if ((r & 0xffffffffu) % 100 < s->hotpct) return (size_t)(at % s->hot_pages);
  return s->hot_pages + (size_t)(at % (s->pages - s->hot_pages));
}

/* pattern=partial: every slot's window, and the two half pages no window covers still zero. */
static int verify_partial(const struct set *s) {
  static uint8_t expect[PAGE];
  const uint8_t *m = (const uint8_t *)s->mem;
  for (size_t i = 0; i < PAGE / 2; i++)
    if (m[i] || m[s->pages * PAGE + PAGE / 2 + i]) {
      size_t at = m[i] ? i : s->pages * PAGE + PAGE / 2 + i;
      say("memverify FAIL page=%zu gen=0 offset=%zu", at / PAGE, at % PAGE);
      return 0;
    }
  for (size_t p = 0; p < s->pages; p++) {
    const uint8_t *w = m + p * PAGE + PAGE / 2;
    partial_expected(expect, p, s->gen[p]);
    for (size_t i = 0; i < PAGE; i++)
      if (w[i] != expect[i]) {
        size_t at = p * PAGE + PAGE / 2 + i;
        say("memverify FAIL page=%zu gen=%u offset=%zu", at / PAGE, s->gen[p], at % PAGE);
        return 0;
      }
  }
  say("memverify ok pages=%zu", s->pages);
  return 1;
}

static int verify(const struct set *s) {
  uint64_t expect[PWORDS];
  if (s->pat == PAT_PARTIAL) return verify_partial(s);
  for (size_t p = 0; p < s->pages; p++) {
    uint64_t *pg = s->mem + p * PWORDS;
    expected_page(s, expect, p, s->gen[p]);
    for (size_t i = 0; i < PWORDS; i++)
      if (pg[i] != expect[i]) {
        say("memverify FAIL page=%zu gen=%u offset=%zu", p, s->gen[p], i * 8);
        return 0;
      }
  }
  say("memverify ok pages=%zu", s->pages);
  return 1;
}

static int parse_pattern(const char *a, enum pattern *pat) {
  char v[16];
  if (!opt_get(a, "pattern", v, sizeof v)) { *pat = PAT_RANDOM; return 1; }
  for (int i = 0; i < 4; i++)
    if (strcmp(v, pattern_name[i]) == 0) { *pat = (enum pattern)i; return 1; }
  return 0;
}

int main(int argc, char **argv) {
  const char *a = argc > 1 ? argv[1] : "";
  long long mib = opt_int(a, "mib", 64), rate = opt_int(a, "rate", 20000), bytes = opt_int(a, "bytes", 4096);
  long long verify_every = opt_int(a, "verify", 10), words = opt_int(a, "words", 4);
  long long hot = opt_int(a, "hot", 0), hotpct = opt_int(a, "hotpct", 90);
  long long burst_on = opt_int(a, "burst_on_ms", 0), burst_off = opt_int(a, "burst_off_ms", 0);
  struct set s = {0};
  if (mib <= 0 || bytes < 8 || bytes > PAGE || rate < 0 || !parse_pattern(a, &s.pat) || words < 1 ||
      words > PWORDS || hot < 0 || hot >= mib || hotpct < 0 || hotpct > 100 || burst_on < 0 || burst_off < 0 ||
      (burst_off > 0 && burst_on == 0)) {
    say("memdirty: bad arguments '%s'", a);
    return 2;
  }
  s.bwords = (size_t)(bytes + 7) / 8;
  s.words = (size_t)words;
  s.pages = (size_t)mib * 256;
  s.hot_pages = (size_t)hot * 256;
  s.hotpct = (unsigned)hotpct;
  /* pattern=partial: one page more, for the last slot's window */
  s.mem = mmap(NULL, (s.pages + (s.pat == PAT_PARTIAL)) * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  s.gen = calloc(s.pages, sizeof *s.gen);
  if (s.mem == MAP_FAILED || !s.gen) { say("memdirty: out of memory"); return 1; }
  text_init();
  for (size_t p = 0; p < s.pages; p++) base_page(&s, s.mem + p * PWORDS, p);
  signal(SIGUSR1, on_usr1);
  if (burst_off > 0)
    say("memdirty started mib=%lld rate=%lld bytes=%lld pattern=%s words=%lld hot=%lld hotpct=%lld burst_on_ms=%lld burst_off_ms=%lld",
        mib, rate, bytes, pattern_name[s.pat], words, hot, hotpct, burst_on, burst_off);
  else
    say("memdirty started mib=%lld rate=%lld bytes=%lld pattern=%s words=%lld hot=%lld hotpct=%lld", mib, rate, bytes,
        pattern_name[s.pat], words, hot, hotpct);

  uint64_t rng = 0x1234567ull, done = 0, window_done = 0;
  double start = now_s(), last_stat = start, last_verify = start;
  /* Bursts: phase k starts at start + k*(ON+OFF); the writes pause for OFF ms after ON ms of writing. Time at rest
   * does not count towards the rate (no catch-up burst after a rest). */
  const double on_s = (double)burst_on / 1000.0, period_s = (double)(burst_on + burst_off) / 1000.0, phase0 = start;
  int resting = 0;
  for (;;) {
    double t = now_s();
    if (burst_off > 0) {
      double pos = (t - phase0) - (double)(long long)((t - phase0) / period_s) * period_s;
      if (pos >= on_s) {
        resting = 1;
        double left = period_s - pos;
        struct timespec ts = {0, (long)((left < 0.01 ? left : 0.01) * 1e9) + 1000};
        if (verify_now) { verify_now = 0; verify(&s); }
        nanosleep(&ts, NULL);
        continue;
      }
      if (resting) { resting = 0; if (rate) start = t - (double)done / (double)rate; }
    }
    uint64_t target = rate ? (uint64_t)((t - start) * (double)rate) : done + 256;
    if (target > done + 4096) { start = t - (double)done / (double)rate; target = done; } /* don't burst after a stall */
    while (done < target) {
      size_t p = pick_page(&s, &rng);
      uint32_t g = s.gen[p] + 1;
      dirty_page(&s, s.mem + p * PWORDS, p, g);
      s.gen[p] = g;
      done++;
      window_done++;
    }
    if (verify_now) { verify_now = 0; verify(&s); }
    if (verify_every > 0 && t - last_verify >= (double)verify_every) { verify(&s); last_verify = now_s(); }
    if (t - last_stat >= 5.0) {
      say("memdirty rate=%.0f pages/s", (double)window_done / (t - last_stat));
      window_done = 0;
      last_stat = t;
    }
    if (rate) { struct timespec ts = {0, 1000000}; nanosleep(&ts, NULL); }
  }
}
