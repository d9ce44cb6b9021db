// A second thread that sends large READ replies. The kernel copies a reply into the
// application's pages inside writev() on /dev/fuse; on the loop thread that copy
// serialises with receiving the next replies from the server. Thread rules: only the
// loop thread submits; the worker only calls fuse_reply_buf and posts the caller's
// completion back to the caller's executor. The data must stay valid until then.
#pragma once

#ifndef FUSE_USE_VERSION
#define FUSE_USE_VERSION 34
#endif

#include <fuse_lowlevel.h>

#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/post.hpp>

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <mutex>
#include <thread>

#include "fuse_front/reply_pipe.hpp"

namespace fuse_front {

class ReplyWorker {
 public:
  ReplyWorker() = default;
  ~ReplyWorker() { stop(); }
  ReplyWorker(const ReplyWorker&) = delete;
  ReplyWorker& operator=(const ReplyWorker&) = delete;

  // fuse_reply_buf(request, data, length) on the worker thread; completes (no
  // arguments) on the caller's executor once the reply is sent. The thread starts
  // with the first reply.
  template <typename Token>
  auto async_reply_buf(fuse_req_t request, const std::byte* data, std::size_t length, Token&& token) {
    return asio::async_initiate<Token, void()>(
        [this, request, data, length](auto handler) {
          submit(new HandlerJob<decltype(handler)>(request, data, length, std::move(handler)));
        },
        token);
  }
  // ReplyPipe::send(request, device, length) on the worker thread; the pipe is
  // the caller's again when the completion runs.
  template <typename Token>
  auto async_reply_piped(fuse_req_t request, ReplyPipe& pipe, int device, std::size_t length, Token&& token) {
    return asio::async_initiate<Token, void()>(
        [this, request, &pipe, device, length](auto handler) {
          auto* job = new HandlerJob<decltype(handler)>(request, nullptr, length, std::move(handler));
          job->pipe = &pipe;
          job->device = device;
          submit(job);
        },
        token);
  }

  // Sends what is queued, then ends the thread. Afterwards nothing touches the
  // session: call it before unmounting.
  void stop();

 private:
  struct Job {
    Job(fuse_req_t request, const std::byte* data, std::size_t length)
        : request(request), data(data), length(length) {}
    virtual ~Job() = default;
    virtual void complete() = 0;  // on the worker: post the completion, then delete this
    fuse_req_t request;
    const std::byte* data;
    std::size_t length;
    ReplyPipe* pipe = nullptr;  // set: the reply is in this pipe, for device
    int device = -1;
  };

  template <typename Handler>
  struct HandlerJob final : Job {
    HandlerJob(fuse_req_t request, const std::byte* data, std::size_t length, Handler handler)
        : Job(request, data, length), handler(std::move(handler)) {}
    void complete() override {
      // Take the executor before the handler is moved from.
      auto executor = asio::get_associated_executor(handler);
      asio::post(executor, std::move(handler));
      delete this;
    }
    Handler handler;
  };

  void submit(Job* job);
  void run();

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Job*> queue_;  // guarded by mutex_
  bool stopping_ = false;   // guarded by mutex_
  std::thread thread_;      // started and joined on the loop thread only
};

}  // namespace fuse_front
