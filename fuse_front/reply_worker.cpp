// The large-reply thread; see reply_worker.hpp. Jobs are made and reused on the
// loop thread; the worker only moves them from the send queue to the finished list.
#include "fuse_front/reply_worker.hpp"

#include <asio/bind_allocator.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>

#include <cstdio>
#include <system_error>

namespace fuse_front {

void ReplyWorker::JobList::push(Job& job) {
  job.next = nullptr;
  if (tail) tail->next = &job;
  else head = &job;
  tail = &job;
}

ReplyWorker::Job* ReplyWorker::JobList::pop() {
  Job* job = head;
  if (!job) return nullptr;
  head = job->next;
  if (!head) tail = nullptr;
  job->next = nullptr;
  return job;
}

ReplyWorker::Job* ReplyWorker::JobList::take_all() {
  Job* jobs = head;
  head = tail = nullptr;
  return jobs;
}

ReplyWorker::~ReplyWorker() {
  stop();
  // Sent, but the loop never ran their resumption (it ends only once idle, so
  // this is for a loop that was abandoned): the handlers are destroyed unrun.
  Job* jobs = nullptr;
  {
    std::lock_guard lock(mutex_);
    jobs = finished_.take_all();
  }
  finish_all(jobs, false);
}

void ReplyWorker::finish_all(Job* jobs, bool run) {
  while (jobs) {
    Job* next = jobs->next;  // finish() gives the job back, which reuses next
    jobs->finish(*this, *jobs, run);
    jobs = next;
  }
}

ReplyWorker::Job& ReplyWorker::take_job() {
  Job* job = free_jobs_;
  if (job) {
    free_jobs_ = job->next;
  } else {
    jobs_.push_back(std::make_unique<Job>());
    job = jobs_.back().get();
  }
  job->next = nullptr;
  job->data = nullptr;
  job->pipe = nullptr;
  job->device = -1;
  return *job;
}

void ReplyWorker::give_job(Job& job) {
  job.finish = nullptr;
  job.next = free_jobs_;
  free_jobs_ = &job;
  if (--outstanding_ == 0) loop_work_ = asio::any_io_executor();
}

void ReplyWorker::send_to_device(fuse_req_t request, const std::byte* data, std::size_t length, ReplyPipe* pipe,
                                 int device) {
  // libfuse replies are thread-safe (its own multi-threaded loop replies from many threads).
  if (pipe) pipe->send(request, device, length);
  else fuse_reply_buf(request, reinterpret_cast<const char*>(data), length);
}

void ReplyWorker::submit(Job& job) {
  if (!thread_.joinable() && !thread_refused_) {
    try {
      thread_ = std::thread([this] { run(); });
    } catch (const std::system_error& refusal) {
      thread_refused_ = true;  // a pids or RLIMIT_NPROC limit: asking again per reply would cost a clone each
      std::fprintf(stderr, "nbdbridge: the system refused the reply thread (%s): replies go out from the event loop\n",
                   refusal.code().message().c_str());
    }
  }
  if (thread_refused_) {
    // Sent here, on the loop, and finished as the thread would: the caller awaits
    // a resumption, and an exception would leave its request unanswered.
    sender_(job.request, job.data, job.length, job.pipe, job.device);
    std::unique_lock lock(mutex_);
    hand_back(job, lock);
    return;
  }
  {
    std::lock_guard lock(mutex_);
    queue_.push(job);
  }
  wake_.notify_one();
}

void ReplyWorker::run() {
  std::unique_lock lock(mutex_);
  for (;;) {
    wake_.wait(lock, [this] { return stopping_ || queue_.head; });
    Job* job = queue_.pop();
    if (!job) return;  // stopping, and everything sent
    lock.unlock();
    sender_(job->request, job->data, job->length, job->pipe, job->device);
    lock.lock();
    hand_back(*job, lock);
  }
}

// A sent job to the loop's finished list; one resumption takes every job handed back
// before it runs. The lock is held on entry and on return, not while posting.
void ReplyWorker::hand_back(Job& job, std::unique_lock<std::mutex>& lock) {
  finished_.push(job);
  if (resume_posted_) return;  // the pending resumption takes this one too
  resume_posted_ = true;
  lock.unlock();
  post_resume();
  lock.lock();
}

void ReplyWorker::post_resume() {
  auto resume = asio::bind_allocator(std::pmr::polymorphic_allocator<std::byte>(&resume_memory_),
                                     [this] { resume_finished(); });
  // io_context's own executor, so that the allocator above is used (any_io_executor drops it).
  if (auto* context_executor = loop_.target<asio::io_context::executor_type>())
    asio::post(*context_executor, std::move(resume));
  else
    asio::post(loop_, std::move(resume));
}

void ReplyWorker::resume_finished() {
  Job* jobs = nullptr;
  {
    std::lock_guard lock(mutex_);
    jobs = finished_.take_all();
    resume_posted_ = false;
  }
  // A resumed caller may submit again: it takes a job from the free list, never
  // one of these until its own finish() gave it back.
  finish_all(jobs, true);
}

void* ReplyWorker::ResumeMemory::do_allocate(std::size_t size, std::size_t alignment) {
  if (size <= capacity && alignment <= alignof(std::max_align_t) && !in_use_) {
    in_use_ = true;
    return block_;
  }
  return ::operator new(size, std::align_val_t(alignment));
}

void ReplyWorker::ResumeMemory::do_deallocate(void* block, std::size_t, std::size_t alignment) {
  if (block == block_) in_use_ = false;
  else ::operator delete(block, std::align_val_t(alignment));
}

void ReplyWorker::stop() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_one();
  thread_.join();
  stopping_ = false;
}

}  // namespace fuse_front
