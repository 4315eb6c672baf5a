// Pre-copy migration, destination side (VMM-neutral; see vm_interface.h and docs/protocol.md).
// Listens on tcp:ADDR:PORT or tls:ADDR:PORT and accepts one migration. Who may send it
// (IncomingSecurity): with tls: every connection is TLS 1.3 and its peer must present a
// certificate from the CA (and, with an allow-list, one of the allowed names) - a connection that
// fails that is dropped like any other that does not belong; plaintext tcp: only on a loopback
// address unless allow_plaintext. The migration itself: a control connection (preamble with the
// protocol version, HELLO; HELLO_ACK carries the capabilities both sides have), its N data
// connections (DATA_HELLO with the same uuid and the same version), builds the machine from
// CONFIG, applies page records from every data connection through a PageSink - per page, an
// entry is applied only if its record's seq is higher than the page's (a delta only onto the
// exact copy it was made against) - restores STATE after END once every record arrived,
// reports READY, and runs the guest on GO.
// Post-copy (kCapPostcopy): a POSTCOPY record before END lists the pages the source has not
// sent; after every earlier page record is applied they are dropped here, guest RAM goes to a
// PostcopyRam (userfaultfd: an access to a missing page waits, a PAGE_REQUEST asks the source
// for it), the state is restored and the guest runs on GO while the rest arrives - pushed on the
// data connections, requested pages on the control connection. Run() returns once POSTCOPY_END
// came and every page is in place (POSTCOPY_DONE). If post-copy fails after GO the guest must
// not run on: guest_started() tells the VMM, which must stop without running it (the
// missing pages stay registered so nothing reads them as zero). Connections that do not belong (bad preamble, wrong
// uuid or version, garbage) are refused with an ERROR record and dropped without disturbing
// the migration.
//
// Progress (GET /vm/migration on the destination): phase() and Stats() answer from any thread
// at any time, from Listen() on and after Run() returned (final figures), without waiting for
// the migration's threads; incoming_stats.h lists the phases and fields.
//
// Threading: Run() blocks the calling thread; it uses the control channel's reader thread, one
// accept thread, one reader thread per data connection and a PROGRESS thread, all joined before
// Run() returns. Abort(), Cancel(), phase() and Stats() are thread-safe. Cancel() and the
// handling of GO are serialised by commit_mu_, so a cancel either wins before GO (the guest never
// starts here) or is refused (it runs here).
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/thread_annotations.h"
#include "migration/engine/incoming_stats.h"
#include "migration/engine/page_sink.h"
#include "migration/engine/postcopy_ram.h"
#include "migration/engine/vm_interface.h"
#include "migration/protocol/pages.h"
#include "migration/transport/control_channel.h"
#include "migration/transport/handshakes.h"
#include "migration/transport/tcp.h"

namespace ferry::migration {

struct IncomingParams {
  int handshake_timeout_ms = 10000;  // preamble + first record of each connection, together
  int idle_timeout_ms = 120000;      // longest silence on the control channel once started
  // What this destination accepts (tests use these to stand in for an older build).
  uint32_t max_protocol_version = kProtocolVersion;
  uint64_t capabilities = kCapsSupported;
  // Post-copy: how long a destination whose connection to the source was cut waits for the
  // source to reconnect (the guest keeps running on the pages it has; threads that touch a
  // missing page wait) before it gives up (failed; the guest never runs on without its pages).
  int recover_timeout_ms = 60000;
  // Post-copy: a connection on which nothing is acknowledged for this long counts as cut.
  int liveness_timeout_ms = 3000;
};

struct IncomingResult {
  std::string uuid;
  std::string source;
  uint32_t protocol_version = 0;
  uint64_t capabilities = 0;
  uint64_t batches = 0;
  uint64_t pages = 0;
  uint64_t bytes = 0;
  // Entries applied, by kind (runs count their pages).
  uint64_t zero_pages = 0, raw_pages = 0, delta_pages = 0, free_pages = 0;
  double restore_ms = 0;
  double resume_ms = 0;
  double total_ms = 0;
  // Post-copy (postcopy_ms = 0: the migration was a pre-copy).
  uint64_t postcopy_missing = 0;  // pages the guest started without
  double postcopy_ms = 0;         // GO -> last page in place
  uint32_t recoveries = 0;        // connections re-established during post-copy
  PostcopyDone faults;
};

// Who may send a migration (ferry-vmm --incoming with --tls-cert/--tls-key/--tls-ca/--tls-allow,
// --allow-plaintext).
struct IncomingSecurity {
  std::shared_ptr<const net::TlsContext> tls;  // a server context: required by tls:, refused with tcp:
  bool allow_plaintext = false;                // tcp: on an address other than loopback
};

class IncomingMigration {
 public:
  // kInvalidArgument when `security` does not fit the endpoint: tls: without a context, a context
  // with tcp:, or tcp: bound to a non-loopback address without allow_plaintext.
  static Result<std::unique_ptr<IncomingMigration>> Listen(const std::string& endpoint, IncomingSecurity security = {});
  ~IncomingMigration();
  uint16_t port() const { return listener_->port(); }
  // Runs one migration. On success the guest runs (DestinationVm::Start was called).
  // On failure the caller must tear the prepared VM down.
  Result<IncomingResult> Run(DestinationVm* vm, const IncomingParams& params = {});
  // Thread-safe: makes Run() fail promptly (operator interrupt).
  void Abort() EXCLUDES(mu_);
  // Thread-safe: Abort() if GO has not been handled yet (the source then resumes its VM);
  // kBusy once the guest started here (it is the only running copy) or the migration ended.
  Status Cancel() EXCLUDES(commit_mu_, mu_);
  IncomingPhase phase() const { return phase_.load(); }
  // Thread-safe snapshot of the progress so far (the final figures once Run() returned).
  IncomingProgress Stats() const EXCLUDES(stats_mu_, mu_);
  // True once the guest was started (GO) - also when Run() then failed in post-copy: the VMM
  // must then stop without running the guest again.
  bool guest_started() const { return guest_started_.load(); }
  bool postcopy_pending() const { return postcopy_ != nullptr && !postcopy_->complete(); }

 private:
  explicit IncomingMigration(std::unique_ptr<Listener> l) : listener_(std::move(l)) {}
  // The source whose HELLO came first (a greeting thread found it; AcceptControl takes it).
  struct Candidate {
    std::unique_ptr<Socket> sock;
    Hello hello;
    uint32_t version = 0;
  };
  static constexpr size_t kMaxHandshakes = 32;  // connections read at once (HandshakeThreads)
  Status AcceptControl(const IncomingParams& params);
  Status TakeControl(Candidate c, const IncomingParams& params);
  // A greeted connection once the migration runs: a data channel, or the source returning in post-copy.
  void Greeted(std::unique_ptr<Socket> sock, Result<Preamble> pre, Result<Record> rec, const IncomingParams& params);
  void AcceptLoop(const IncomingParams& params);
  void DataReader(Socket* sock, uint32_t channel);
  Status ApplyRecord(const Record& rec, Decompressor& dec, std::vector<uint8_t>* scratch);
  Status ApplyEntries(const PagesView& v);
  void ProgressLoop();
  Status ControlLoop(DestinationVm* vm, const IncomingParams& params, IncomingResult* out);
  Status StartPostcopy();
  Status PostcopyLoop(const IncomingParams& params, IncomingResult* out);
  Status PostcopyWait(const IncomingParams& params);
  // A cut during post-copy: drop every connection, wait for the source to come back (HELLO with
  // this migration's uuid on the listening port), tell it what is still missing (RECOVER).
  Status AwaitRecovery(const IncomingParams& params, const Error& why);
  bool Recoverable(const Error& e);
  void StartProgress();
  void StopProgress();
  Status SendControl(RecordType type, std::span<const uint8_t> payload, bool mandatory = true);
  // Control-channel fold (reader thread, channel lock held): pages requested in post-copy.
  bool FoldControl(const Record& r) EXCLUDES(mu_);
  void DataFailed(const Error& e) EXCLUDES(mu_);
  // Interrupts `control` (may be null). The channel runs FoldControl - which takes mu_ - with its
  // own lock held, so nothing calls into a ControlChannel while holding mu_ (lock order: the
  // channel's lock, then mu_).
  void ControlInterrupt(ControlChannel* control, const Error& e) EXCLUDES(mu_);
  Status CheckDataError();
  void Cleanup();
  // Progress publication (control thread): the phase, and the figures of `out` known so far.
  void SetPhase(IncomingPhase p, const IncomingResult& out);
  void SetFinal(const Status& s, const IncomingResult& out);

  std::unique_ptr<Listener> listener_;
  std::string listen_;  // the endpoint given to Listen (const after it)
  std::shared_ptr<const net::TlsContext> tls_;  // const after Listen; null: plaintext
  // Set under mu_ after the handshake; replaced (under mu_ and send_mu_) when post-copy recovers.
  // Only the control thread writes it, so it reads it without a lock; other threads read it
  // holding mu_ or send_mu_. "Either of two locks" has no GUARDED_BY form: this comment is the rule.
  std::unique_ptr<ControlChannel> control_;
  std::vector<std::unique_ptr<ControlChannel>> retired_controls_;  // kept alive for late readers
  Mutex send_mu_;  // sends from other threads (PAGE_REQUEST) vs replacing control_
  Hello hello_;
  uint32_t version_ = kProtocolVersion;  // of this migration (the control preamble's)
  uint64_t caps_ = 0;                    // acknowledged capabilities
  std::thread acceptor_;
  std::thread progress_;  // PROGRESS sender (kCapProgress)
  std::atomic<bool> stopping_{false};
  std::atomic<bool> aborted_{false};
  uint64_t t_end_ = 0;  // END received (control thread only; for the downtime log)

  mutable Mutex mu_;  // mutable: Stats() reads the counters it guards
  std::condition_variable cv_;
  std::vector<std::unique_ptr<Socket>> data_ GUARDED_BY(mu_);
  std::vector<std::thread> readers_ GUARDED_BY(mu_);
  std::vector<bool> channel_used_ GUARDED_BY(mu_);
  uint64_t batches_applied_ GUARDED_BY(mu_) = 0;
  // Pre-copy: once END's count is met, no page record is applied any more (none may change RAM
  // while the state is restored or the guest runs). Readers hold it shared while they apply and
  // count a record; sealing takes it exclusively, so no apply is in flight after it.
  SharedMutex seal_mu_;
  bool sealed_ GUARDED_BY(seal_mu_) = false;
  std::optional<Error> data_error_ GUARDED_BY(mu_);

  // RAM, published once the machine is prepared (before CONFIG_ACK).
  std::atomic<bool> ram_ready_{false};
  RamView ram_;
  uint64_t ram_pages_ = 0;
  std::unique_ptr<PageSink> sink_;
  // Post-copy: the missing pages (POSTCOPY), then the sink that places them. active_sink_ is
  // sink_ or postcopy_, switched while no page record is being applied (all announced ones are).
  std::optional<PostcopyStart> postcopy_start_;  // control thread only
  std::unique_ptr<PostcopyRam> postcopy_;
  std::atomic<PageSink*> active_sink_{nullptr};
  std::atomic<bool> postcopy_active_{false};
  std::atomic<bool> guest_started_{false};
  std::atomic<bool> progress_stop_{false};
  // Recovery: the acceptor hands a returning source's control connection over here.
  bool recovering_ GUARDED_BY(mu_) = false;
  std::unique_ptr<Socket> recover_sock_ GUARDED_BY(mu_);
  uint64_t gen_batches_base_ GUARDED_BY(mu_) = 0;  // records applied before this connection
  uint64_t gen_pages_base_ = 0;                 // control thread only
  uint32_t recoveries_ = 0;                     // control thread only
  int liveness_timeout_ms_ = 3000;              // from the IncomingParams of Run()
  Decompressor ctl_dec_;                // control reader thread only
  std::vector<uint8_t> ctl_scratch_;    // control reader thread only
  uint64_t ctl_batches_ GUARDED_BY(mu_) = 0;  // page records applied from the control connection
  static constexpr size_t kStripes = 256;
  Mutex stripes_[kStripes];
  // last_seq_[gfn] is guarded by stripes_[gfn % kStripes] (a per-element lock: not expressible as
  // GUARDED_BY; the vector itself is sized before the first reader starts).
  std::vector<uint64_t> last_seq_;
  std::atomic<uint64_t> pages_applied_{0}, bytes_received_{0};
  std::atomic<uint64_t> zero_pages_{0}, raw_pages_{0}, delta_pages_{0}, free_pages_{0};

  // Progress for Stats() (incoming_stats.h).
  std::atomic<IncomingPhase> phase_{IncomingPhase::kWaiting};
  std::atomic<uint64_t> t_start_ns_{0};  // control connection accepted
  std::atomic<uint64_t> t_go_ns_{0};     // GO handled (post-copy time runs from here)
  std::atomic<uint64_t> t_final_ns_{0};  // final phase reached
  std::atomic<PostcopyRam*> pc_view_{nullptr};  // postcopy_ once started (lives as long as *this)
  Mutex commit_mu_;                      // Cancel() vs the handling of GO (guest_started_)
  mutable Mutex stats_mu_;
  IncomingProgress info_ GUARDED_BY(stats_mu_);  // identity, times and final figures
  std::optional<Candidate> candidate_ GUARDED_BY(mu_);
  bool control_taken_ GUARDED_BY(mu_) = false;   // a source was accepted; later HELLOs are busy
  // Last: its greeting threads use the members above; Cleanup() and its destructor join them.
  HandshakeThreads handshakes_{kMaxHandshakes};
};

}  // namespace ferry::migration
