// The kernels' own worker threads: `pool::run(n, grain, fn)` calls fn(begin, end) over [0, n) on up
// to at::get_num_threads() threads, the caller included (included by cpu_kernels.cpp; used by the
// decode products and the fused ops; dequant_mm stays on at::parallel_for, whose regions make the
// at::mm inside them run serially).
//
// Why not OpenMP regions: with OpenMP's passive wait (dsv4's default, because spinning OpenMP threads
// collapse next to a busy process) every region wakes its threads, ~50 us each on the development
// VM, and ends in a barrier that waits for the slowest thread, so a region whose other thread is
// descheduled waits for a scheduler time slice. A decode step is ~10 regions per layer. Here:
//  - the caller takes work too, and the work is claimed a chunk at a time from one atomic counter, so
//    the caller alone finishes a loop whose workers are asleep or descheduled; it waits only for
//    chunks a worker has already claimed;
//  - a worker that runs out of chunks keeps looking for the next loop for kSpinNs before it sleeps,
//    pausing at first and then yielding the core at every turn, so that next to other work its
//    spinning costs that work little. A decode step's loops follow each other within tens of
//    microseconds, so they find the workers awake.
// A loop started inside a loop (from fn), or while another thread's loop runs, runs serially.

#include <sched.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace pool {

constexpr int64_t kSpinNs = 2'000'000;  // how long an idle worker looks for work before sleeping
constexpr int64_t kPauseNs = 50'000;    // of which the first part only pauses, without yielding
constexpr int64_t kChunksPerThread = 4;  // chunks per thread and loop: a late thread still gets work

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline thread_local bool t_inside = false;  // a pool worker, or a caller inside its loop

class Pool {
 public:
  static Pool*& instance() {
    static Pool* p = [] {
      // a forked child has none of the workers, and maybe a lock a worker held: it starts afresh
      // (the old pool is left as it is, never touched again)
      pthread_atfork(nullptr, nullptr, [] { instance() = new Pool(); });
      return new Pool();  // never destroyed: workers may be asleep in it at exit
    }();
    return p;
  }

  template <class F>
  void run(int64_t n, int64_t grain, const F& fn) {
    const int64_t threads = at::get_num_threads();
    const int64_t g = std::max<int64_t>(grain, 1);
    const int64_t step = (n + std::min((n + g - 1) / g, threads * kChunksPerThread) - 1) /
                         std::max<int64_t>(1, std::min((n + g - 1) / g, threads * kChunksPerThread));
    const int64_t chunks = n > 0 ? (n + step - 1) / step : 0;
    if (chunks <= 1 || threads <= 1 || t_inside || !mu_.try_lock()) {
      if (n > 0) fn(0, n);
      return;
    }
    std::lock_guard<std::mutex> hold(mu_, std::adopt_lock);
    start_workers(threads - 1);
    t_inside = true;
    allowed_.store(threads - 1, std::memory_order_relaxed);
    // The loop's fields are written before the ticket that publishes them and read only by whoever
    // claims a chunk of that ticket; the next loop rewrites them only once every chunk is done.
    ctx_ = &fn;
    call_ = [](const void* c, int64_t b, int64_t e) noexcept { (*static_cast<const F*>(c))(b, e); };  // fn must not throw
    n_ = n;
    step_ = step;
    done_.store(0, std::memory_order_relaxed);
    gen_ = (gen_ + 1) & 0xFFFF;
    ticket_.store((gen_ << 48) | (uint64_t(chunks) << 24), std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> g(sleep_mu_);
      wake_.notify_all();
    }
    while (work_once()) {
    }
    for (int64_t spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins) {
      if (spins < 4096) _mm_pause();
      else sched_yield();  // the worker holding the last chunk may be waiting for this core
    }
    t_inside = false;
  }

 private:
  static constexpr uint64_t kMask24 = (1u << 24) - 1;

  // Claims and runs one chunk of the current loop; false when none is left to claim.
  bool work_once() {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t next = t & kMask24, total = (t >> 24) & kMask24;
      if (next >= total) return false;
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        const int64_t b = int64_t(next) * step_;
        call_(ctx_, b, std::min(n_, b + step_));
        done_.fetch_add(1, std::memory_order_release);
        return true;
      }
    }
  }

  bool has_work(int id) const {
    const uint64_t t = ticket_.load(std::memory_order_seq_cst);
    return id < allowed_.load(std::memory_order_relaxed) && (t & kMask24) < ((t >> 24) & kMask24);
  }

  void start_workers(int64_t want) {
    for (; started_ < want; ++started_) std::thread([this, id = int(started_)] { worker(id); }).detach();
  }

  void worker(int id) {
    t_inside = true;
    for (;;) {
      int64_t last = now_ns();
      for (;;) {
        if (id < allowed_.load(std::memory_order_relaxed) && work_once()) {
          while (work_once()) {
          }
          last = now_ns();
          continue;
        }
        const int64_t idle = now_ns() - last;
        if (idle > kSpinNs) break;
        if (idle < kPauseNs) {
          for (int i = 0; i < 16; ++i) _mm_pause();
        } else {
          sched_yield();
        }
      }
      std::unique_lock<std::mutex> lk(sleep_mu_);
      sleeping_.fetch_add(1, std::memory_order_seq_cst);
      wake_.wait(lk, [&] { return has_work(id); });
      sleeping_.fetch_sub(1, std::memory_order_relaxed);
    }
  }

  std::mutex mu_;  // one loop at a time
  int64_t started_ = 0;
  uint64_t gen_ = 0;
  // (generation: 16 bits | chunks: 24 | next chunk to claim: 24): a claim sees its loop's size in
  // the same word, so it can never claim past a loop's end or into a loop it did not see
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> allowed_{0};  // workers [0, allowed_) take part (threads - 1 of the last loop)
  const void* ctx_ = nullptr;
  void (*call_)(const void*, int64_t, int64_t) = nullptr;
  int64_t n_ = 0, step_ = 1;
  std::mutex sleep_mu_;
  std::condition_variable wake_;
  std::atomic<int> sleeping_{0};
};

// fn(begin, end) over [0, n) in chunks of at least `grain` (but for the last), on the pool.
template <class F>
inline void run(int64_t n, int64_t grain, const F& fn) {
  Pool::instance()->run(n, grain, fn);
}

}  // namespace pool
