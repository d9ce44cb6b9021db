// The large-reply thread; see reply_worker.hpp.
#include "fuse_front/reply_worker.hpp"

namespace fuse_front {

void ReplyWorker::submit(Job* job) {
  if (!thread_.joinable()) thread_ = std::thread([this] { run(); });
  {
    std::lock_guard lock(mutex_);
    queue_.push_back(job);
  }
  wake_.notify_one();
}

void ReplyWorker::run() {
  std::unique_lock lock(mutex_);
  for (;;) {
    wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, and everything sent
    Job* job = queue_.front();
    queue_.pop_front();
    lock.unlock();
    // libfuse replies are thread-safe (its own multi-threaded loop replies from many threads).
    if (job->pipe) job->pipe->send(job->request, job->device, job->length);
    else fuse_reply_buf(job->request, reinterpret_cast<const char*>(job->data), job->length);
    job->complete();
    lock.lock();
  }
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
