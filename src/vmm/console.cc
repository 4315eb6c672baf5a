#include "vmm/console.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <termios.h>
#include <unistd.h>

#include "machine/devices/uart/uart.h"

namespace ferry {
namespace {
termios g_saved_termios;  // restored at exit; only written once, before threads start
void RestoreTty() { tcsetattr(STDIN_FILENO, TCSANOW, &g_saved_termios); }
}  // namespace

Result<std::unique_ptr<Console>> Console::Create(const std::string& spec) {
  std::unique_ptr<Console> c(new Console());
  if (spec == "stdio") {
    c->out_fd_ = STDOUT_FILENO;
    c->in_fd_ = STDIN_FILENO;
  } else if (spec.rfind("file:", 0) == 0 && spec.size() > 5) {
    std::string path = spec.substr(5);
    c->out_fd_ = open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (c->out_fd_ < 0) return ErrnoError("open console file '" + path + "'");
    c->own_fd_ = true;
  } else if (spec != "none") {
    return Errorf(ErrorCode::kInvalidArgument, "invalid --console '{}' (expected stdio, file:PATH or none)", spec);
  }
  return c;
}

Console::~Console() {
  Flush();
  if (loop_ && in_fd_ >= 0) loop_->Remove(in_fd_);
  if (raw_tty_) RestoreTty();
  if (own_fd_) close(out_fd_);
}

void Console::Write(std::span<const uint8_t> bytes) {
  if (out_fd_ < 0) return;
  buf_.insert(buf_.end(), bytes.begin(), bytes.end());
  if (buf_.size() >= 4096 || (!bytes.empty() && bytes.back() == '\n')) Flush();
}

void Console::Flush() {
  size_t off = 0;
  while (off < buf_.size()) {
    ssize_t n = write(out_fd_, buf_.data() + off, buf_.size() - off);
    if (n <= 0) break;  // console gone: drop rather than block the VM
    off += static_cast<size_t>(n);
  }
  buf_.clear();
}

Status Console::AttachInput(EventLoop* loop, Uart* uart) {
  if (in_fd_ < 0) return {};
  if (isatty(in_fd_)) {
    if (tcgetattr(in_fd_, &g_saved_termios) == 0) {
      termios raw = g_saved_termios;
      cfmakeraw(&raw);
      raw.c_oflag |= OPOST | ONLCR;
      raw.c_lflag |= ISIG;  // keep Ctrl-C for the host
      if (tcsetattr(in_fd_, TCSANOW, &raw) == 0) {
        raw_tty_ = true;
        atexit(RestoreTty);
      }
    }
  }
  int flags = fcntl(in_fd_, F_GETFL);
  fcntl(in_fd_, F_SETFL, flags | O_NONBLOCK);
  loop_ = loop;
  int fd = in_fd_;
  auto s = loop->Add(in_fd_, EPOLLIN, [this, fd, uart](uint32_t ev) {
    uint8_t b[256];
    ssize_t n = read(fd, b, sizeof b);
    if (n > 0) {
      uart->PushInput(std::span<const uint8_t>(b, static_cast<size_t>(n)));
    } else if (n == 0 || (ev & (EPOLLHUP | EPOLLERR))) {
      loop_->Remove(fd);  // stdin closed: stop reading, keep the VM running
      in_fd_ = -1;
    }
  });
  if (!s) {
    // stdin may be a regular file or /dev/null (not pollable): run without input.
    in_fd_ = -1;
  }
  return {};
}

}  // namespace ferry
