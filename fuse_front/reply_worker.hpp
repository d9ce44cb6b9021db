// A second thread that sends large READ replies. The kernel copies a reply into the
// application's pages inside writev() on /dev/fuse; on the loop thread that copy
// serialises with receiving the next replies from the server. Thread rules: only the
// loop thread submits and resumes callers; the worker only sends replies and hands
// finished jobs back. The data must stay valid until the caller is resumed.
#pragma once

#ifndef FUSE_USE_VERSION
#define FUSE_USE_VERSION 34
#endif

#include <fuse_lowlevel.h>

#include <asio/any_io_executor.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/execution/outstanding_work.hpp>
#include <asio/prefer.hpp>

#include <condition_variable>
#include <cstddef>
#include <memory>
#include <memory_resource>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include "fuse_front/reply_pipe.hpp"

namespace fuse_front {

class ReplyWorker {
 public:
  // Sends one reply on the worker thread: from data, or (pipe set) from the pipe
  // to device. The default writes to /dev/fuse; unit tests pass their own.
  using Sender = void (*)(fuse_req_t request, const std::byte* data, std::size_t length, ReplyPipe* pipe,
                          int device);
  static void send_to_device(fuse_req_t request, const std::byte* data, std::size_t length, ReplyPipe* pipe,
                             int device);

  explicit ReplyWorker(Sender sender = send_to_device) : sender_(sender) {}
  // Only once the loop has run out of work (no resumption still posted).
  ~ReplyWorker();
  ReplyWorker(const ReplyWorker&) = delete;
  ReplyWorker& operator=(const ReplyWorker&) = delete;

  // fuse_reply_buf(request, data, length) on the worker thread; completes (no
  // arguments) on the loop thread once the reply is sent. Callers' handlers run
  // on the loop thread (coroutines there, or bound to its executor). The thread
  // starts with the first reply.
  template <typename Token>
  auto async_reply_buf(fuse_req_t request, const std::byte* data, std::size_t length, Token&& token) {
    return asio::async_initiate<Token, void()>(
        [this, request, data, length](auto handler) {
          Job& job = hold(std::move(handler));
          job.request = request;
          job.data = data;
          job.length = length;
          submit(job);
        },
        token);
  }
  // ReplyPipe::send(request, device, length) on the worker thread; the pipe is
  // the caller's again when the completion runs.
  template <typename Token>
  auto async_reply_piped(fuse_req_t request, ReplyPipe& pipe, int device, std::size_t length, Token&& token) {
    return asio::async_initiate<Token, void()>(
        [this, request, &pipe, device, length](auto handler) {
          Job& job = hold(std::move(handler));
          job.request = request;
          job.length = length;
          job.pipe = &pipe;
          job.device = device;
          submit(job);
        },
        token);
  }

  // Sends what is queued, then ends the thread. Afterwards nothing touches the
  // session: call it before unmounting. Callers whose replies went out are
  // resumed by the loop as usual.
  void stop();

  // Jobs ever made: the peak number of replies in flight at once (tests).
  std::size_t jobs_made() const { return jobs_.size(); }

 private:
  // Room for the caller's completion handler inside a job (use_awaitable's is two
  // pointers): jobs are reused, so a reply allocates nothing once the pool has
  // grown to the number in flight.
  static constexpr std::size_t handler_capacity = 64;

  struct Job {
    fuse_req_t request = nullptr;
    const std::byte* data = nullptr;
    std::size_t length = 0;
    ReplyPipe* pipe = nullptr;  // set: the reply is in this pipe, for device
    int device = -1;
    Job* next = nullptr;  // in the send queue, the finished list or the free list
    // On the loop thread: takes the handler out, gives the job back, then runs
    // the handler (run) or only destroys it.
    void (*finish)(ReplyWorker& worker, Job& job, bool run) = nullptr;
    alignas(std::max_align_t) std::byte handler[handler_capacity];
  };

  // A singly linked first-in first-out list of jobs.
  struct JobList {
    Job* head = nullptr;
    Job* tail = nullptr;
    void push(Job& job);
    Job* pop();
    Job* take_all();
  };

  template <typename Handler>
  Job& hold(Handler handler) {
    static_assert(sizeof(Handler) <= handler_capacity && alignof(Handler) <= alignof(std::max_align_t),
                  "the completion handler does not fit a job");
    if (!loop_) loop_ = asio::get_associated_executor(handler);  // before the handler is moved from
    // The loop's run() must not return while a caller waits on this thread.
    if (outstanding_++ == 0) loop_work_ = asio::prefer(loop_, asio::execution::outstanding_work.tracked);
    Job& job = take_job();
    new (job.handler) Handler(std::move(handler));
    job.finish = [](ReplyWorker& worker, Job& job, bool run) {
      auto* stored = std::launder(reinterpret_cast<Handler*>(job.handler));
      Handler handler(std::move(*stored));
      stored->~Handler();
      worker.give_job(job);
      // Called directly: callers' handlers belong on the loop thread, and
      // asio::dispatch through the type-erased executor would allocate.
      if (run) std::move(handler)();
    };
    return job;
  }

  Job& take_job();
  void give_job(Job& job);
  void submit(Job& job);
  void run();
  // Worker thread: asks the loop to resume the finished jobs' callers. At most
  // one such request is pending, so its memory is one block kept here.
  void hand_back(Job& job, std::unique_lock<std::mutex>& lock);
  void post_resume();
  void resume_finished();  // loop thread
  // Loop thread: finishes a chain of sent jobs, running their callers' handlers
  // or (run false) only destroying them.
  void finish_all(Job* jobs, bool run);

  // The resume request's memory: one block, with the heap behind it. Asio frees
  // an operation's memory before it runs the operation, and the worker posts
  // again only after the running one has cleared resume_posted_, so the block is
  // never wanted twice at once.
  class ResumeMemory : public std::pmr::memory_resource {
    void* do_allocate(std::size_t size, std::size_t alignment) override;
    void do_deallocate(void* block, std::size_t size, std::size_t alignment) override;
    bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override { return this == &other; }
    static constexpr std::size_t capacity = 256;
    alignas(std::max_align_t) std::byte block_[capacity];
    bool in_use_ = false;
  };

  const Sender sender_;

  // Loop thread only.
  std::vector<std::unique_ptr<Job>> jobs_;  // every job made; grows to the peak in flight
  Job* free_jobs_ = nullptr;
  std::size_t outstanding_ = 0;      // jobs taken and not yet given back
  asio::any_io_executor loop_work_;  // counts as the loop's work while outstanding_ > 0
  asio::any_io_executor loop_;       // set before the thread starts; read by it afterwards

  std::mutex mutex_;
  std::condition_variable wake_;
  JobList queue_;               // guarded by mutex_: to send
  JobList finished_;            // guarded by mutex_: sent, callers to resume
  bool resume_posted_ = false;  // guarded by mutex_
  bool stopping_ = false;       // guarded by mutex_
  std::thread thread_;          // started and joined on the loop thread only
  bool thread_refused_ = false;  // the system would not start it: replies go out from the loop
  ResumeMemory resume_memory_;
};

}  // namespace fuse_front
