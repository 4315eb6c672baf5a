// epoll-based event loop. The VMM's machine thread owns one and polls it between
// vCPU time slices (and blocks in it while the hart sits in WFI), so device
// backends (TAP, console input) run on the machine thread without extra locking.
//
// Threading: Add/Remove/Poll on the owning thread only; Wake() is thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <unordered_map>

#include "common/error.h"

namespace ferry {

class EventLoop {
 public:
  using Callback = std::function<void(uint32_t epoll_events)>;

  static Result<std::unique_ptr<EventLoop>> Create();
  ~EventLoop();

  Status Add(int fd, uint32_t epoll_events, Callback cb);
  Status Modify(int fd, uint32_t epoll_events);
  void Remove(int fd);
  // Dispatches ready callbacks. timeout_ms: 0 = don't block, -1 = forever.
  // Returns the number of callbacks run.
  Result<int> Poll(int timeout_ms);
  // Blocks until Wake() (or timeout) without running any callback: used while the VM
  // is paused so device backends cannot touch guest memory or device state.
  Status WaitForWake(int timeout_ms);
  // Interrupts a blocking Poll/WaitForWake from any thread.
  void Wake();

 private:
  EventLoop(int epfd, int wakefd);
  int epfd_;
  int wakefd_;
  std::unordered_map<int, std::shared_ptr<Callback>> callbacks_;
};

}  // namespace ferry
