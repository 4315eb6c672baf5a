#include "common/event_loop.h"

#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>

namespace ferry {

Result<std::unique_ptr<EventLoop>> EventLoop::Create() {
  int ep = epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) return ErrnoError("epoll_create1");
  int wfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wfd < 0) {
    auto e = ErrnoError("eventfd");
    close(ep);
    return e;
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = wfd;
  if (epoll_ctl(ep, EPOLL_CTL_ADD, wfd, &ev) != 0) {
    auto e = ErrnoError("epoll_ctl wake fd");
    close(ep);
    close(wfd);
    return e;
  }
  return std::unique_ptr<EventLoop>(new EventLoop(ep, wfd));
}

EventLoop::EventLoop(int epfd, int wakefd) : epfd_(epfd), wakefd_(wakefd) {}

EventLoop::~EventLoop() {
  close(epfd_);
  close(wakefd_);
}

Status EventLoop::Add(int fd, uint32_t events, Callback cb) {
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;
  if (epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev) != 0) return ErrnoError("epoll_ctl add");
  callbacks_[fd] = std::make_shared<Callback>(std::move(cb));
  return {};
}

Status EventLoop::Modify(int fd, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;
  if (epoll_ctl(epfd_, EPOLL_CTL_MOD, fd, &ev) != 0) return ErrnoError("epoll_ctl mod");
  return {};
}

void EventLoop::Remove(int fd) {
  epoll_ctl(epfd_, EPOLL_CTL_DEL, fd, nullptr);
  callbacks_.erase(fd);
}

Result<int> EventLoop::Poll(int timeout_ms) {
  epoll_event evs[32];
  int n = epoll_wait(epfd_, evs, 32, timeout_ms);
  if (n < 0) {
    if (errno == EINTR) return 0;
    return ErrnoError("epoll_wait");
  }
  int ran = 0;
  for (int i = 0; i < n; ++i) {
    int fd = evs[i].data.fd;
    if (fd == wakefd_) {
      uint64_t v;
      [[maybe_unused]] ssize_t r = read(wakefd_, &v, sizeof v);
      continue;
    }
    auto it = callbacks_.find(fd);
    if (it == callbacks_.end()) continue;
    auto cb = it->second;  // keep alive if the callback removes itself
    (*cb)(evs[i].events);
    ++ran;
  }
  return ran;
}

Status EventLoop::WaitForWake(int timeout_ms) {
  pollfd p{wakefd_, POLLIN, 0};
  int n = poll(&p, 1, timeout_ms);
  if (n < 0 && errno != EINTR) return ErrnoError("poll wake fd");
  if (n > 0) {
    uint64_t v;
    [[maybe_unused]] ssize_t r = read(wakefd_, &v, sizeof v);
  }
  return {};
}

void EventLoop::Wake() {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t r = write(wakefd_, &one, sizeof one);
}

}  // namespace ferry
