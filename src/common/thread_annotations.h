// Lock annotations that clang checks (-Wthread-safety; the clang build, scripts/test-clang, turns
// every finding into an error), and a mutex that carries them. GCC builds see empty macros.
//
//   Mutex mu_;
//   int count_ GUARDED_BY(mu_);            // read/written only with mu_ held
//   void Bump() REQUIRES(mu_);             // callers hold mu_
//   void Poke() EXCLUDES(mu_);             // callers must not hold mu_ (it takes it)
//   { MutexLock l(mu_); ++count_; l.Wait(cv_, [&]() REQUIRES(mu_) { return count_ > 3; }); }
//
// MutexLock is the scoped holder; it also runs condition-variable waits (the wait releases and
// re-acquires mu, which the analysis treats as held throughout - as the code after it may). A
// predicate lambda declares REQUIRES(mu) so its reads are checked too.
// SharedMutex is the reader/writer variant: WriterLock holds it exclusively, ReaderLock shared;
// a member GUARDED_BY it may be read under either and written only under WriterLock.
// std::mutex itself is unannotated in libstdc++: code that must keep one (third-party
// callbacks) says why next to it.
#pragma once

#include <condition_variable>
#include <mutex>
#include <shared_mutex>

#if defined(__clang__)
#define FERRY_TSA(x) __attribute__((x))
#else
#define FERRY_TSA(x)
#endif

#define CAPABILITY(x) FERRY_TSA(capability(x))
#define SCOPED_CAPABILITY FERRY_TSA(scoped_lockable)
#define GUARDED_BY(x) FERRY_TSA(guarded_by(x))
#define PT_GUARDED_BY(x) FERRY_TSA(pt_guarded_by(x))
#define REQUIRES(...) FERRY_TSA(requires_capability(__VA_ARGS__))
#define REQUIRES_SHARED(...) FERRY_TSA(requires_shared_capability(__VA_ARGS__))
#define ACQUIRE(...) FERRY_TSA(acquire_capability(__VA_ARGS__))
#define ACQUIRE_SHARED(...) FERRY_TSA(acquire_shared_capability(__VA_ARGS__))
#define RELEASE(...) FERRY_TSA(release_capability(__VA_ARGS__))
#define RELEASE_SHARED(...) FERRY_TSA(release_shared_capability(__VA_ARGS__))
#define TRY_ACQUIRE(...) FERRY_TSA(try_acquire_capability(__VA_ARGS__))
#define EXCLUDES(...) FERRY_TSA(locks_excluded(__VA_ARGS__))
#define ASSERT_CAPABILITY(x) FERRY_TSA(assert_capability(x))
#define RETURN_CAPABILITY(x) FERRY_TSA(lock_returned(x))
#define NO_THREAD_SAFETY_ANALYSIS FERRY_TSA(no_thread_safety_analysis)

namespace ferry {

class CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;
  void Lock() ACQUIRE() { mu_.lock(); }
  void Unlock() RELEASE() { mu_.unlock(); }
  bool TryLock() TRY_ACQUIRE(true) { return mu_.try_lock(); }

 private:
  friend class MutexLock;
  std::mutex mu_;
};

class SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& mu) ACQUIRE(mu) : lock_(mu.mu_) {}
  ~MutexLock() RELEASE() {}
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

  // Condition-variable waits on the held mutex.
  void Wait(std::condition_variable& cv) { cv.wait(lock_); }
  template <class Pred>
  void Wait(std::condition_variable& cv, Pred pred) {
    cv.wait(lock_, pred);
  }
  template <class Duration, class Pred>
  bool WaitFor(std::condition_variable& cv, Duration d, Pred pred) {
    return cv.wait_for(lock_, d, pred);
  }
  template <class Duration>
  std::cv_status WaitFor(std::condition_variable& cv, Duration d) {
    return cv.wait_for(lock_, d);
  }
  template <class TimePoint, class Pred>
  bool WaitUntil(std::condition_variable& cv, TimePoint t, Pred pred) {
    return cv.wait_until(lock_, t, pred);
  }
  template <class TimePoint>
  std::cv_status WaitUntil(std::condition_variable& cv, TimePoint t) {
    return cv.wait_until(lock_, t);
  }
  // Early release and re-acquire within the scope.
  void Unlock() RELEASE() { lock_.unlock(); }
  void Lock() ACQUIRE() { lock_.lock(); }

 private:
  std::unique_lock<std::mutex> lock_;
};

class CAPABILITY("mutex") SharedMutex {
 public:
  SharedMutex() = default;
  SharedMutex(const SharedMutex&) = delete;
  SharedMutex& operator=(const SharedMutex&) = delete;
  void Lock() ACQUIRE() { mu_.lock(); }
  void Unlock() RELEASE() { mu_.unlock(); }
  void LockShared() ACQUIRE_SHARED() { mu_.lock_shared(); }
  void UnlockShared() RELEASE_SHARED() { mu_.unlock_shared(); }

 private:
  std::shared_mutex mu_;
};

// Scoped exclusive holder of a SharedMutex.
class SCOPED_CAPABILITY WriterLock {
 public:
  explicit WriterLock(SharedMutex& mu) ACQUIRE(mu) : mu_(mu) { mu_.Lock(); }
  ~WriterLock() RELEASE() { mu_.Unlock(); }
  WriterLock(const WriterLock&) = delete;
  WriterLock& operator=(const WriterLock&) = delete;

 private:
  SharedMutex& mu_;
};

// Scoped shared holder of a SharedMutex.
class SCOPED_CAPABILITY ReaderLock {
 public:
  explicit ReaderLock(SharedMutex& mu) ACQUIRE_SHARED(mu) : mu_(mu) { mu_.LockShared(); }
  ~ReaderLock() RELEASE() { mu_.UnlockShared(); }
  ReaderLock(const ReaderLock&) = delete;
  ReaderLock& operator=(const ReaderLock&) = delete;

 private:
  SharedMutex& mu_;
};

}  // namespace ferry
