// One tunneled TCP connection between the two gateways (see gateway.h).
// All members except inbox_ are owned by the session thread (Run()).
#pragma once

#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/compress.h"
#include "common/thread_annotations.h"
#include "gateway/conn.h"
#include "gateway/gateway.h"

namespace ferry::gateway {

class Session {
 public:
  using Clock = std::chrono::steady_clock;
  // local_fd: the plain TCP socket (client on forward side, destination on serve side).
  Session(Gateway* gw, uint64_t id, int local_fd, std::unique_ptr<Conn> ctrl, size_t window, int streams);
  ~Session();
  uint64_t id() const { return id_; }
  // Runs until the session ends. Forward side connects data connections itself.
  void Run();
  // Thread-safe: hands over an accepted data connection (serve side).
  void AddDataConn(std::unique_ptr<Conn> c, uint16_t index);
  // Thread-safe: wakes the session thread (e.g. gateway stopping).
  void Wake();
  // atomics + the detail snapshot (diag_mu_). Never the session id: it is the credential for JOIN,
  // and /status needs no authentication; `seq` (the gateway's count of sessions at its start) names it.
  std::string StatusJsonFields() const;
  uint64_t seq = 0;  // set by Gateway::RegisterSession; read by StatusJsonFields (both under the gateway's lock)

 private:
  struct DataConn {
    std::unique_ptr<Conn> c;
    uint16_t index;
    size_t in_off = 0;
    bool ready = false;  // poll() reported it readable this iteration
    bool stalled = false;  // bypassed as stuck: gets no new chunks until it has drained
  };
  struct Chunk {
    std::vector<uint8_t> frame;
    uint16_t slot;     // data connection (index) it was last queued on
    size_t raw_len;
    uint64_t end_pos;  // that connection's `appended` right after this frame
  };
  enum class End { kNone, kClean, kFailed };

  void Loop();
  bool ConnectDataConn(uint16_t index);
  void TakeInbox();
  void ReadData(DataConn& d);
  void ReadCtrl();
  void HandleCtrlFrame(const Frame& f);
  void HandleDataFrame(const Frame& f);
  void ReadLocal();
  void WriteLocal();
  bool FlushConn(Conn& c);  // false on error
  void LoseDataConn(size_t i, const std::string& why);
  void SendCtrl(FrameType t, std::span<const uint8_t> p);
  void Fail(const std::string& why, bool tell_peer);
  void ProtocolError(const std::string& why);
  void ResetLocal();
  void MaybeAck(bool force);
  void CheckDone();
  DataConn* PickConn(int exclude_index = -1);
  void QueueChunk(DataConn& d, Chunk& c);  // appends c's frame to d and records where it ends
  // Stalled-connection bypass: see docs/gateway.md ("A stuck data connection").
  void MaybeBypassStuckConn(Clock::time_point now);
  std::vector<uint8_t> MakeDataFrame(uint64_t seq, const uint8_t* p, size_t n);
  // Chunk-sized buffers are recycled: without this every 256 KiB chunk (each way) was a
  // fresh allocation whose pages the kernel zeroes and faults in (~20% of the gateway's CPU
  // at 1 Gbit/s). At most kMaxSpareBufs are kept.
  std::vector<uint8_t> TakeBuf();
  void GiveBuf(std::vector<uint8_t>&& b);

  Gateway* gw_;
  GatewayCounters& ctr_;
  const uint64_t id_;
  int local_fd_;
  std::unique_ptr<Conn> ctrl_;
  size_t ctrl_in_off_ = 0;
  const size_t window_;
  int wake_fd_;
  bool forward_;
  int streams_;
  void Pace(int fd) const;

  Mutex inbox_mu_;
  std::vector<DataConn> inbox_ GUARDED_BY(inbox_mu_);

  std::vector<DataConn> data_;
  std::vector<uint16_t> reconnect_;  // forward: indexes to re-establish
  int reconnect_attempts_ = 0;
  bool orphans_ = false;  // unacked chunks whose connection is gone and not yet re-queued
  Clock::time_point no_data_since_;
  bool have_no_data_since_ = false;

  // Sending direction (local -> peer).
  uint64_t next_seq_ = 0;
  std::map<uint64_t, Chunk> unacked_;
  Clock::time_point ack_progress_;  // last time the peer's cumulative ACK advanced (or sending began)
  Clock::time_point last_bypass_check_;
  size_t unacked_bytes_ = 0;
  bool send_paused_ = false;  // high/low watermark hysteresis
  bool local_eof_ = false;
  bool fin_sent_ = false;
  int skip_compress_ = 0;

  // Receiving direction (peer -> local).
  uint64_t next_expected_ = 0;
  std::map<uint64_t, std::vector<uint8_t>> reorder_;
  size_t reorder_bytes_ = 0;
  std::vector<uint8_t> deliver_;
  size_t deliver_off_ = 0;
  std::optional<uint64_t> peer_fin_;
  bool local_wr_shut_ = false;
  uint64_t last_ack_sent_ = 0;
  Clock::time_point last_ack_time_;

  Clock::time_point last_ctrl_rx_;
  Clock::time_point last_ping_;
  bool sent_close_ = false;
  bool peer_closed_ = false;
  End end_ = End::kNone;
  std::vector<uint8_t> scratch_;
  std::vector<std::vector<uint8_t>> spare_;  // see TakeBuf
  PayloadWriter payload_;                    // DATA payload being built (capacity reused)
  std::vector<uint8_t> compress_tmp_;
  Compressor compressor_;      // sending direction's lz4/zstd contexts
  Decompressor decompressor_;  // receiving direction's

  void UpdateDetail();  // session thread, once a second
  mutable Mutex diag_mu_;
  std::string detail_json_ GUARDED_BY(diag_mu_);  // per-connection queues, oldest unacked, next expected

  // Exported (read by the status thread).
  std::atomic<uint64_t> st_sent_{0}, st_received_{0}, st_data_conns_{0};
  std::atomic<uint64_t> st_unacked_{0}, st_reorder_{0};  // window use: sender's unacked, receiver's reorder bytes
};

}  // namespace ferry::gateway
