// Console backends for the guest's UART (and SBI debug console): stdio, file:PATH, none.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/event_loop.h"

namespace ferry {

class Uart;

class Console {
 public:
  // spec: "stdio", "file:PATH" or "none".
  static Result<std::unique_ptr<Console>> Create(const std::string& spec);
  ~Console();
  // Guest output (machine thread). Buffered; flushed at line ends and by Flush().
  void Write(std::span<const uint8_t> bytes);
  void Flush();
  // Feeds host input (stdin for "stdio") into the UART via the event loop.
  Status AttachInput(EventLoop* loop, Uart* uart);

 private:
  Console() = default;
  int out_fd_ = -1;
  bool own_fd_ = false;
  bool raw_tty_ = false;
  int in_fd_ = -1;
  EventLoop* loop_ = nullptr;
  std::vector<uint8_t> buf_;
};

}  // namespace ferry
