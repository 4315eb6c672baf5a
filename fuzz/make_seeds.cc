// Seed corpora for the fuzz targets, made with Ferry's own encoders (so the fuzzers start from
// valid inputs of every kind and mutate from there).
//   ferry-fuzz-seeds DIR   ->  DIR/migration_records/, DIR/page_records/, DIR/gateway_frames/
#include <sys/stat.h>

#include <array>
#include <cstring>
#include <cstdio>
#include <string>
#include <vector>

#include <unistd.h>

#include "common/compress.h"
#include "machine/board.h"
#include "gateway/protocol.h"
#include "migration/codec/xbzrle.h"
#include "migration/protocol/pages.h"
#include "migration/protocol/wire.h"
#include "vmm/snapshot.h"

using namespace ferry;
using namespace ferry::migration;

namespace {

std::string g_dir;
int g_count = 0;

void Put(const std::string& target, uint8_t selector, std::span<const uint8_t> bytes, bool with_selector = true) {
  const std::string dir = g_dir + "/" + target;
  mkdir(dir.c_str(), 0755);
  const std::string path = dir + "/seed-" + std::to_string(g_count++);
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) {
    std::perror(path.c_str());
    std::exit(1);
  }
  if (with_selector) std::fputc(selector, f);
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
}

std::span<const uint8_t> Payload(std::span<const uint8_t> record) { return record.subspan(kRecordHeaderSize); }

void MigrationRecords() {
  const char* t = "migration_records";
  Put(t, 0, EncodePreamble(Role::kControl));
  Put(t, 0, EncodePreamble(Role::kData, 1));
  Put(t, 1, EncodeRecord(RecordType::kHello, Encode(Hello{{1, 2, 3}, kCapsSupported, 4, kWirePageSize})));
  Put(t, 1, EncodeRecord(RecordType::kEnd, Encode(End{12, 3456})));
  Put(t, 2, Encode(Hello{{9}, kCapsSupported, 16, kWirePageSize}));
  Put(t, 3, Encode(HelloAck{{9}, kCapsSupported}));
  Put(t, 4, Encode(DataHello{{9}, 3}));
  Put(t, 5, EncodeConfig(nlohmann::json{{"ram_bytes", 268435456}, {"cmdline", "console=ttyS0"}, {"devices", {{"net", true}}}}));
  Put(t, 6, Encode(StateRecord{"vcpu:0", std::vector<uint8_t>(300, 7)}));
  Put(t, 6, Encode(StateRecord{"dev:virtio-net", {1, 2, 3}}));
  Put(t, 7, Encode(End{1, 2}));
  Put(t, 8, Encode(ErrorMsg{5, "another source was first"}));
  Put(t, 9, EncodeCancel("cancelled by operator"));
  Put(t, 10, Encode(Progress{10, 20}));
  Put(t, 11, EncodeU64(123456789));
}

void PageRecords() {
  const char* t = "page_records";
  std::array<uint8_t, kWirePageSize> page{}, old{};
  for (size_t i = 0; i < page.size(); ++i) page[i] = static_cast<uint8_t>("ferry page text "[i % 16]);
  old = page;
  for (size_t i = 0; i < page.size(); i += 512) page[i] ^= 0x5a;
  PagesBuilder v1;
  v1.Reset(7);
  v1.AddZero(3);
  v1.AddRaw(4, page.data());
  Put(t, 0, Payload(v1.Finish()));
  std::array<uint8_t, kWirePageSize> delta{};
  const size_t dlen = XbzrleEncode(old.data(), page.data(), delta.data(), kMaxDeltaBytes);
  Compressor comp;
  for (int variant = 0; variant < 4; ++variant) {
    EncodedPagesBuilder b;
    b.Reset(9 + variant, true);
    b.AddZeroRun(0, 5);
    b.AddFreeRun(10, 20);
    b.AddRaw(40, page.data());
    if (dlen > 0) b.AddDelta(41, 3, std::span<const uint8_t>(delta.data(), dlen));
    b.AddZero(50);
    std::vector<uint8_t> body(b.body().begin(), b.body().end()), packed;
    std::span<const uint8_t> rec;
    if (variant == 1 && comp.Compress(Compression::kLz4, 0, body, &packed)) rec = b.Finish(Compression::kLz4, packed);
    else if (variant == 2 && comp.Compress(Compression::kZstd, 1, body, &packed)) rec = b.Finish(Compression::kZstd, packed);
    else rec = b.Finish();
    Put(t, 1, Payload(rec));
  }
}

void GatewayFrames() {
  using namespace ferry::gateway;
  const char* t = "gateway_frames";
  std::vector<uint8_t> stream;
  PayloadWriter hello;
  hello.U64(0x1122334455667788ull).U16(4).U32(65536).Str("10.0.0.2:4444");
  EncodeFrame(FrameType::kHello, 0, hello.data(), &stream);
  PayloadWriter join;
  join.U64(0x1122334455667788ull).U16(2);
  EncodeFrame(FrameType::kJoin, 0, join.data(), &stream);
  PayloadWriter ping;
  ping.U64(123);
  EncodeFrame(FrameType::kPing, 0, ping.data(), &stream);
  PayloadWriter err;
  err.U32(2).Str("window too large");
  EncodeFrame(FrameType::kError, 0, err.data(), &stream);
  Put(t, 0, stream, false);
  for (uint8_t ty = 1; ty <= kMaxFrameType; ++ty) {
    std::vector<uint8_t> one;
    std::vector<uint8_t> payload(ty * 3, ty);
    EncodeFrame(static_cast<FrameType>(ty), static_cast<uint16_t>(ty & kFlagsMask), payload, &one);
    Put(t, 0, one, false);
  }
}

// For fuzz_devices: each device's own saved state, then a few guest RAM bytes and MMIO accesses
// (virtio: magic, version, device id, status writes, queue select / notify).
void Devices() {
  const char* t = "devices";
  char tmpl[] = "/tmp/ferry-seed-disk-XXXXXX";
  const int fd = mkstemp(tmpl);
  if (fd < 0 || ftruncate(fd, 1 << 20) != 0) std::exit(1);
  close(fd);
  BoardConfig cfg;
  cfg.ram_bytes = kMinRam;
  cfg.disk = tmpl;
  cfg.balloon = true;
  cfg.console_out = [](std::span<const uint8_t>) {};
  auto board = Board::Create(cfg, false);
  if (!board) {
    std::fprintf(stderr, "ferry-fuzz-seeds: board: %s\n", board.error().message().c_str());
    std::exit(1);
  }
  auto devs = (*board)->devices();
  for (size_t i = 0; i < devs.size(); ++i) {
    std::vector<uint8_t> in;
    const std::vector<uint8_t> blob = devs[i]->SaveState();
    in.push_back(static_cast<uint8_t>(i));
    in.push_back(static_cast<uint8_t>(blob.size()));
    in.push_back(static_cast<uint8_t>(blob.size() >> 8));
    in.insert(in.end(), blob.begin(), blob.end());
    in.push_back(1);  // one RAM write: a descriptor at offset 0x1000
    const uint8_t desc[] = {0x00, 0x20, 0, 0x80, 0, 0, 0, 0, 0x00, 0x02, 0, 0, 0x01, 0, 0x01, 0};
    in.push_back(0x00);
    in.push_back(0x10);
    in.push_back(sizeof desc);
    in.insert(in.end(), desc, desc + sizeof desc);
    auto op = [&](uint8_t code, uint16_t off, uint64_t value) {
      in.push_back(code);
      in.push_back(static_cast<uint8_t>(off));
      in.push_back(static_cast<uint8_t>(off >> 8));
      for (int b = 0; b < 8; ++b) in.push_back(static_cast<uint8_t>(value >> (8 * b)));
    };
    const uint8_t region = static_cast<uint8_t>((i % 5) << 3);
    op(region | 2, 0x000, 0);          // read magic (virtio) / register 0
    op(region | 2, 0x008, 0);          // device id
    op(region | 4 | 2, 0x070, 1 | 2);  // status: ACKNOWLEDGE | DRIVER
    op(region | 4 | 2, 0x030, 0);      // queue select 0
    op(region | 4 | 2, 0x038, 8);      // queue size 8
    op(region | 4 | 2, 0x080, 0x80001000);
    op(region | 4 | 2, 0x044, 1);      // queue ready
    op(region | 4 | 2, 0x050, 0);      // notify queue 0
    op(region | 2, 0x060, 0);          // interrupt status
    Put(t, 0, in, false);
  }
  unlink(tmpl);
}

// For fuzz_snapshot: snapshots of a fresh 16 MiB board written by WriteSnapshot (one with a few
// non-zero RAM pages, one with a balloon), each once as is (byte 0 = 0: the file's own CRCs) and
// once for the harness to re-CRC (byte 0 = 1).
void Snapshots() {
  const char* t = "snapshot";
  char dir[] = "/tmp/ferry-seed-snap-XXXXXX";
  if (!mkdtemp(dir)) std::exit(1);
  const std::string path = std::string(dir) + "/snap";
  for (int variant = 0; variant < 2; ++variant) {
    BoardConfig cfg;
    cfg.ram_bytes = kMinRam;
    cfg.balloon = variant == 1;
    cfg.console_out = [](std::span<const uint8_t>) {};
    auto board = Board::Create(cfg, false);
    if (!board) std::exit(1);
    if (variant == 0)
      for (uint64_t p = 0; p < 3; ++p) std::memset((*board)->memory().host() + p * 5 * kPageSize, 0x40 + static_cast<int>(p), 64);
    SnapshotState st;
    st.config = {{"board", (*board)->config().GuestJson()}, {"vmm", "ferry-vmm"}};
    st.vcpu = (*board)->vcpu().SaveState();
    for (Device* d : (*board)->devices()) st.devices[d->id()] = d->SaveState();
    if (auto s = WriteSnapshot(path, st, (*board)->memory()); !s) {
      std::fprintf(stderr, "ferry-fuzz-seeds: snapshot: %s\n", s.error().message().c_str());
      std::exit(1);
    }
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) std::exit(1);
    std::vector<uint8_t> bytes;
    for (int c; (c = std::fgetc(f)) != EOF;) bytes.push_back(static_cast<uint8_t>(c));
    std::fclose(f);
    Put(t, 0, bytes);
    Put(t, 1, bytes);
    unlink(path.c_str());
  }
  rmdir(dir);
}

// For fuzz_incoming_migration: whole pre-copy migrations as a source sends them - [flags][u16 len]
// control bytes (preamble, HELLO, CONFIG for the harness's 16 MiB destination, STATE, END, GO),
// then per data channel [u16 len] its bytes (preamble, DATA_HELLO, page records). One v2 migration
// over two channels (ENCODED_PAGES: zero and free runs, raw pages, a delta), one v1 migration over
// one channel (PAGES) for a destination that speaks at most v1.
void IncomingMigrations() {
  const char* t = "incoming_migration";
  const Uuid uuid{0xfe, 0x77, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14};
  auto append = [](std::vector<uint8_t>* out, std::span<const uint8_t> b) { out->insert(out->end(), b.begin(), b.end()); };
  auto segment = [&](std::vector<uint8_t>* in, const std::vector<uint8_t>& seg) {
    in->push_back(static_cast<uint8_t>(seg.size()));
    in->push_back(static_cast<uint8_t>(seg.size() >> 8));
    append(in, seg);
  };
  std::array<uint8_t, kWirePageSize> page{}, next{};
  for (size_t i = 0; i < page.size(); ++i) page[i] = static_cast<uint8_t>("incoming page "[i % 14]);
  next = page;
  for (size_t i = 0; i < next.size(); i += 700) next[i] ^= 0x21;
  std::array<uint8_t, kWirePageSize> delta{};
  const size_t dlen = XbzrleEncode(page.data(), next.data(), delta.data(), kMaxDeltaBytes);
  for (const uint32_t version : {2u, 1u}) {
    const uint32_t channels = version == 2 ? 2 : 1;
    const uint64_t caps = version == 2 ? kCapsSupported & ~kCapPostcopy : kCapProgress;
    std::vector<std::vector<uint8_t>> data(channels);
    uint64_t batches = 0, pages = 0;
    for (uint32_t ch = 0; ch < channels; ++ch) {
      append(&data[ch], EncodePreamble(Role::kData, version));
      append(&data[ch], EncodeRecord(RecordType::kDataHello, Encode(DataHello{uuid, ch})));
    }
    if (version == 2) {
      EncodedPagesBuilder b;
      b.Reset(1, true);
      b.AddZeroRun(0, 8);
      b.AddFreeRun(8, 8);
      b.AddRaw(16, page.data());
      b.AddZero(17);
      append(&data[0], b.Finish());
      b.Reset(2, true);  // after seq 1 on the same channel: the delta's base is in place
      if (dlen > 0) b.AddDelta(16, 1, std::span<const uint8_t>(delta.data(), dlen));
      else b.AddRaw(16, next.data());
      append(&data[0], b.Finish());
      b.Reset(3, true);
      b.AddRaw(20, next.data());
      append(&data[1], b.Finish());
      batches = 3;
      pages = 18 + 1 + 1;
    } else {
      PagesBuilder b;
      b.Reset(1);
      b.AddZero(3);
      b.AddRaw(4, page.data());
      append(&data[0], b.Finish());
      batches = 1;
      pages = 2;
    }
    std::vector<uint8_t> ctl;
    append(&ctl, EncodePreamble(Role::kControl, version));
    append(&ctl, EncodeRecord(RecordType::kHello, Encode(Hello{uuid, caps, channels, kWirePageSize})));
    append(&ctl, EncodeRecord(RecordType::kConfig, EncodeConfig(nlohmann::json{{"ram", 16ull << 20}})));
    append(&ctl, EncodeRecord(RecordType::kState, Encode(StateRecord{"vcpu:0", {1, 2, 3}})));
    append(&ctl, EncodeRecord(RecordType::kState, Encode(StateRecord{"dev:uart0", std::vector<uint8_t>(40, 7)})));
    append(&ctl, EncodeRecord(RecordType::kEnd, Encode(End{batches, pages})));
    append(&ctl, EncodeRecord(RecordType::kGo, {}));
    std::vector<uint8_t> in;
    in.push_back(version == 1 ? 1 : 0);
    segment(&in, ctl);
    for (const auto& d : data) segment(&in, d);
    Put(t, 0, in, false);
  }
}

// For fuzz_http_api: [flags][method][path][u16 n][path suffix '\n' header lines][body] - GET and
// PUT on each path of the harness's table (indexes 0..15), against both servers, with the bodies
// the API documents (snapshot path, migrate and recover targets) where they apply.
void HttpRequests() {
  const char* t = "http_api";
  for (uint8_t server = 0; server < 2; ++server)
    for (uint8_t method = 0; method < 2; ++method)
      for (uint8_t path = 0; path < 16; ++path) {
        std::string extra = path == 7 ? "?verbose=1\nAccept: application/json\r\n" : "\nUser-Agent: ferry\r\n";
        std::string body;
        if (method == 1 && path == 3) body = R"({"path": "vm.snap"})";
        if (method == 1 && path == 6) body = R"({"to": "tcp:127.0.0.1:1", "channels": 2, "downtime_ms": 50})";
        if (method == 1 && path == 10) body = R"({"to": "tcp:127.0.0.1:1"})";
        std::vector<uint8_t> in = {server, method, path, static_cast<uint8_t>(extra.size()), static_cast<uint8_t>(extra.size() >> 8)};
        in.insert(in.end(), extra.begin(), extra.end());
        in.insert(in.end(), body.begin(), body.end());
        Put(t, 0, in, false);
      }
}

// For fuzz_virtio_net: no state blob, then a driver's setup of RX queue 0 (rings at RAM 0x4000,
// 0x5000, 0x6000) and TX queue 1 (0x1000, 0x2000, 0x3000), one posted RX buffer and one TX frame
// (ops: 0 RAM write, 25 MMIO 4-byte write, 2 frame from the network, 3 loop poll).
void VirtioNetSeeds() {
  const char* t = "virtio_net";
  std::vector<uint8_t> in = {0, 0};
  auto u16 = [&](uint16_t v) {
    in.push_back(static_cast<uint8_t>(v));
    in.push_back(static_cast<uint8_t>(v >> 8));
  };
  auto mmio = [&](uint16_t off, uint64_t v) {
    in.push_back(1 | 8 | 16);
    u16(off);
    for (int b = 0; b < 8; ++b) in.push_back(static_cast<uint8_t>(v >> (8 * b)));
  };
  auto ram = [&](uint16_t off, std::vector<uint8_t> bytes) {
    in.push_back(0);
    u16(off);
    in.push_back(static_cast<uint8_t>(bytes.size()));
    in.insert(in.end(), bytes.begin(), bytes.end());
  };
  auto le = [](uint64_t v, int n) {
    std::vector<uint8_t> b;
    for (int i = 0; i < n; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
    return b;
  };
  auto cat = [](std::initializer_list<std::vector<uint8_t>> parts) {
    std::vector<uint8_t> out;
    for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
    return out;
  };
  mmio(0x70, 1 | 2);
  mmio(0x24, 1);
  mmio(0x20, 1);  // VERSION_1
  mmio(0x24, 0);
  mmio(0x20, 1 << 5);  // MAC
  mmio(0x70, 1 | 2 | 8);
  const uint64_t ram0 = 0x80000000;
  for (int q = 0; q < 2; ++q) {
    const uint64_t base = ram0 + (q == 0 ? 0x4000 : 0x1000);
    mmio(0x30, static_cast<uint64_t>(q));
    mmio(0x38, 16);
    mmio(0x80, base & 0xffffffff);
    mmio(0x84, base >> 32);
    mmio(0x90, (base + 0x1000) & 0xffffffff);
    mmio(0x94, (base + 0x1000) >> 32);
    mmio(0xa0, (base + 0x2000) & 0xffffffff);
    mmio(0xa4, (base + 0x2000) >> 32);
    mmio(0x44, 1);
  }
  mmio(0x70, 1 | 2 | 8 | 4);
  // RX: one 2 KiB device-writable buffer at 0xa000.
  ram(0x4000, cat({le(ram0 + 0xa000, 8), le(2048, 4), le(2, 2), le(0, 2)}));
  ram(0x5000, cat({le(0, 2), le(1, 2), le(0, 2)}));
  // TX: a 72-byte frame (header + 60 bytes) at 0x8000.
  std::vector<uint8_t> frame(72, 0);
  for (int i = 0; i < 6; ++i) frame[12 + i] = 0xff;
  frame[24] = 0x08; frame[25] = 0x06;
  ram(0x8000, frame);
  ram(0x1000, cat({le(ram0 + 0x8000, 8), le(72, 4), le(0, 2), le(0, 2)}));
  ram(0x2000, cat({le(0, 2), le(1, 2), le(0, 2)}));
  mmio(0x50, 1);  // notify TX
  mmio(0x50, 0);  // notify RX
  in.push_back(2);  // a frame from the network
  u16(static_cast<uint16_t>(frame.size()));
  in.insert(in.end(), frame.begin(), frame.end());
  in.push_back(3);
  mmio(0x64, 1);  // interrupt acknowledge
  Put(t, 0, in, false);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: ferry-fuzz-seeds DIR\n");
    return 2;
  }
  g_dir = argv[1];
  mkdir(g_dir.c_str(), 0755);
  MigrationRecords();
  PageRecords();
  GatewayFrames();
  Devices();
  Snapshots();
  IncomingMigrations();
  HttpRequests();
  VirtioNetSeeds();
  std::printf("ferry-fuzz-seeds: %d seeds in %s\n", g_count, g_dir.c_str());
  return 0;
}
