// recv()/send()/shutdown()/close() for the whole process, batching on attached sockets (see
// socket_batching.hpp). The executable's definitions take precedence over the C
// library's for libnbd's calls, since libnbd imports them from the global scope.
// Per socket state is reached through a fixed table indexed by descriptor; only the
// thread driving that socket touches its state.
#undef _FORTIFY_SOURCE  // the fortified headers define recv() inline
#include "nbd_client/socket_batching.hpp"

#include <atomic>
#include <cerrno>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

namespace nbd_client::socket_batching {

namespace {

struct SocketState {
  std::unique_ptr<std::byte[]> input{new std::byte[input_capacity]};
  std::size_t input_begin = 0;
  std::size_t input_end = 0;
  // What the socket reported while fill() read ahead: handed to libnbd once the
  // buffered bytes before it are consumed, as its own recv() would have seen it.
  bool input_ended = false;
  int input_error = 0;
  // Bytes libnbd was told were sent that are still ours to write.
  std::vector<std::byte> output;
  std::size_t output_sent = 0;
  // libnbd is part way through a large payload: its next recv() reads straight
  // into its buffer, so fill() only looks (MSG_PEEK) instead of reading ahead,
  // which would copy the payload twice.
  bool inside_large_payload = false;
  // The last payload libnbd read was large (1 MiB reads): read ahead only a
  // little, since what follows a reply header is mostly payload that would be
  // copied twice (1 MiB reads at depth 8 spent 20% more CPU with 64 KiB).
  bool large_payloads = false;
  // libnbd has read through our recv() on this socket. Until then fill() only
  // peeks: a libnbd that reads some other way would never see read-ahead bytes.
  bool recv_seen = false;
  // Where libnbd's next recv() starts if it continues the read that returned
  // short (or would have blocked) last: the rest of a payload asked for again
  // says nothing new of payload sizes (a 1 MiB payload's 10 KiB tail is not a
  // small payload, and must not turn full read-ahead back on).
  const std::byte* resumes_at = nullptr;
  // READ payloads in flight that go to pipes; few, searched by every recv() while
  // there are any (a payload's tail may be asked for in a short call).
  PipedPayload* piped[max_piped_payloads] = {};
  std::size_t piped_count = 0;
  // WRITE payloads sent by reference, and the pipe their pages pass through
  // (made at the first one). The pipe holds the `in_pipe` bytes that end at
  // `pipe_end`: handed over, not yet taken by the socket, so not yet reported
  // sent to libnbd, whose next send() starts with them.
  SentByReference* by_reference[max_piped_payloads] = {};
  std::size_t by_reference_count = 0;
  int send_pipe[2] = {-1, -1};
  std::size_t in_pipe = 0;
  const std::byte* pipe_end = nullptr;

  SocketState() = default;
  SocketState(const SocketState&) = delete;
  SocketState& operator=(const SocketState&) = delete;
  ~SocketState() {
    for (int end : send_pipe)
      if (end >= 0) ::syscall(SYS_close, end);
  }

  std::size_t read_ahead() const { return large_payloads ? short_read_ahead : input_capacity; }

  std::size_t buffered() const { return input_end - input_begin; }
  std::size_t held() const { return output.size() - output_sent; }
};

// NBD sockets are among a process's first descriptors; a socket numbered past the
// table simply goes unbatched.
constexpr int table_size = 4096;
std::atomic<SocketState*> table[table_size];

SocketState* state_of(int fd) {
  if (fd < 0 || fd >= table_size) return nullptr;
  return table[fd].load(std::memory_order_acquire);
}

void forget(int fd) {
  if (fd < 0 || fd >= table_size) return;
  delete table[fd].exchange(nullptr, std::memory_order_acq_rel);
}

void consume_buffered(SocketState& state, std::size_t count) {
  state.input_begin += count;
  if (state.input_begin == state.input_end) state.input_begin = state.input_end = 0;
}

std::size_t take_buffered(SocketState& state, void* buffer, std::size_t length) {
  std::size_t count = std::min(length, state.buffered());
  std::memcpy(buffer, state.input.get() + state.input_begin, count);
  consume_buffered(state, count);
  return count;
}

// With nothing buffered, an end of stream or an error that fill() saw is due now.
bool end_due(SocketState& state, ssize_t& result) {
  if (state.input_error) {
    errno = std::exchange(state.input_error, 0);
    result = -1;
    return true;
  }
  if (state.input_ended) {
    result = 0;
    return true;
  }
  return false;
}

// What recv() returns once `delivered` bytes are in libnbd's hands and the
// system call after them returned `got` <= 0: the bytes first, and an end of
// stream or a real error kept for the next call, as recv() itself would report them.
ssize_t after_last_bytes(SocketState& state, std::size_t delivered, ssize_t got) {
  if (delivered == 0) return got;  // errno from the call
  if (got == 0) state.input_ended = true;
  else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) state.input_error = errno;
  return ssize_t(delivered);
}

// Sends held bytes, then `length` bytes of `data`, in one call. Returns how many
// of `data`'s bytes went out; -1 with errno when none did (EAGAIN if only the held
// bytes moved, so libnbd retries the same data once the socket drains).
ssize_t send_joined(int fd, SocketState& state, const void* data, std::size_t length, int flags) {
  iovec parts[2];
  int count = 0;
  if (state.held()) parts[count++] = {state.output.data() + state.output_sent, state.held()};
  if (length) parts[count++] = {const_cast<void*>(data), length};
  msghdr message{};
  message.msg_iov = parts;
  message.msg_iovlen = std::size_t(count);
  ssize_t sent = ::sendmsg(fd, &message, flags);
  if (sent < 0) return -1;
  std::size_t from_held = std::min(std::size_t(sent), state.held());
  state.output_sent += from_held;
  if (state.held() == 0) {
    state.output.clear();
    state.output_sent = 0;
  }
  std::size_t from_data = std::size_t(sent) - from_held;
  if (from_data == 0 && length != 0) {
    errno = EAGAIN;
    return -1;
  }
  return ssize_t(from_data);
}

// The registered payload whose buffer holds [buffer, buffer + length), if any.
template <typename Payload>
Payload* registered_at(Payload* const* payloads, std::size_t count, const void* buffer, std::size_t length) {
  const auto* start = static_cast<const std::byte*>(buffer);
  for (std::size_t i = 0; i < count; ++i) {
    Payload* payload = payloads[i];
    if (start >= payload->buffer && start + length <= payload->buffer + payload->length) return payload;
  }
  return nullptr;
}

template <typename Payload>
bool add_registered(Payload** payloads, std::size_t& count, Payload* payload) {
  if (count == max_piped_payloads) return false;
  payloads[count++] = payload;
  return true;
}

template <typename Payload>
void remove_registered(Payload** payloads, std::size_t& count, Payload* payload) {
  for (std::size_t i = 0; i < count; ++i) {
    if (payloads[i] != payload) continue;
    payloads[i] = payloads[--count];
    payloads[count] = nullptr;
    return;
  }
}

constexpr ssize_t not_piped = -2;

// libnbd's recv() of `length` bytes into a piped payload's buffer. Returns what
// recv() would, or not_piped when these bytes must go to the buffer instead:
// they are not the next ones in order, or the pipe is full. Once diverted, a
// payload stays in its buffer; its issuer moves the piped part back.
ssize_t receive_into_pipe(int fd, SocketState& state, PipedPayload& payload, void* buffer, std::size_t length) {
  if (payload.diverted) return not_piped;
  if (static_cast<std::byte*>(buffer) != payload.buffer + payload.piped) {
    payload.diverted = true;
    return not_piped;
  }
  std::size_t moved = 0;
  if (state.buffered()) {
    // Read ahead before libnbd asked for the payload: a few KiB, copied once.
    std::size_t count = std::min(length, state.buffered());
    ssize_t wrote = ::write(payload.pipe, state.input.get() + state.input_begin, count);
    if (wrote <= 0) {
      payload.diverted = true;
      return not_piped;
    }
    consume_buffered(state, std::size_t(wrote));
    moved = std::size_t(wrote);
    payload.piped += moved;
    if (moved == length || state.buffered()) return ssize_t(moved);
  } else if (ssize_t result; end_due(state, result)) {
    return result;
  }
  // The socket's pages move into the pipe: no copy, and the server's send
  // buffer is free again at once. "Would block" means an empty socket or a
  // full pipe; only the socket can say which, and what it holds stays there
  // (we are its only reader), so a second try that would block has a full pipe.
  for (bool socket_holds_data = false;;) {
    ssize_t got = ::splice(fd, nullptr, payload.pipe, nullptr, length - moved, SPLICE_F_NONBLOCK);
    if (got > 0) {
      payload.piped += std::size_t(got);
      moved += std::size_t(got);
      state.inside_large_payload = moved < length;
      return ssize_t(moved);
    }
    if (got == 0 || moved) return after_last_bytes(state, moved, got);
    if ((errno != EAGAIN && errno != EWOULDBLOCK) || socket_holds_data) break;
    std::byte peeked;
    if (::recvfrom(fd, &peeked, 1, MSG_DONTWAIT | MSG_PEEK, nullptr, nullptr) < 0 &&
        (errno == EAGAIN || errno == EWOULDBLOCK)) {
      state.inside_large_payload = true;
      errno = EAGAIN;
      return -1;
    }
    socket_holds_data = true;
  }
  // A full pipe, or a socket splice() cannot read: the rest goes to the buffer.
  payload.diverted = true;
  return not_piped;
}

// recv() on a batched socket: read-ahead first, then the socket, a payload to
// its pipe when one is registered for this address.
ssize_t receive_batched(int fd, SocketState& state, void* buffer, std::size_t length) {
  if (state.piped_count) {  // a payload's tail may be short: every call is looked at
    if (PipedPayload* payload = registered_at(state.piped, state.piped_count, buffer, length)) {
      ssize_t result = receive_into_pipe(fd, state, *payload, buffer, length);
      if (result != not_piped) return result;
    }
  }
  std::size_t copied = 0;
  if (state.buffered()) {
    copied = take_buffered(state, buffer, length);
    // A large payload's rest is read straight into place below; a small
    // request is served from the buffer alone.
    if (copied == length || length - copied < large_payload) return ssize_t(copied);
  } else if (ssize_t result; end_due(state, result)) {
    return result;
  }
  // One call fills the caller's buffer and reads ahead behind it: a large
  // payload lands where libnbd wants it, the replies after it come along.
  auto* rest = static_cast<std::byte*>(buffer) + copied;
  std::size_t wanted = length - copied;
  iovec parts[2] = {{rest, wanted}, {state.input.get(), state.read_ahead()}};
  msghdr message{};
  message.msg_iov = parts;
  message.msg_iovlen = 2;
  ssize_t got = ::recvmsg(fd, &message, 0);
  state.inside_large_payload = wanted >= large_payload && got < ssize_t(wanted);
  if (got <= 0) return after_last_bytes(state, copied, got);
  if (std::size_t(got) > wanted) {
    state.input_begin = 0;
    state.input_end = std::size_t(got) - wanted;
    got = ssize_t(wanted);
  }
  return ssize_t(copied + std::size_t(got));
}

// Writes the held bytes without blocking; true when none remain. On false,
// errno says why (EAGAIN: the socket is full).
bool flush_held(int fd, SocketState& state) {
  if (state.held() == 0) return true;
  if (send_joined(fd, state, nullptr, 0, MSG_NOSIGNAL | MSG_DONTWAIT) >= 0 && state.held()) errno = EAGAIN;
  return state.held() == 0;
}

bool make_send_pipe(SocketState& state) {
  if (state.send_pipe[0] >= 0) return true;
  if (::pipe2(state.send_pipe, O_CLOEXEC | O_NONBLOCK) != 0) return false;
  ::fcntl(state.send_pipe[1], F_SETPIPE_SZ, int(send_pipe_size));  // else the default size: more rounds
  return true;
}

constexpr ssize_t not_by_reference = -2;

// libnbd's send() of `length` bytes of a payload registered as sent by
// reference. Held bytes (the command's header) go first; then the pages go
// into the pipe (vmsplice(), which takes references) and on to the socket
// (splice(), which for unix and TCP sockets takes them over without a copy).
// What the socket did not take stays in the pipe, and libnbd, told only of what
// the socket took, asks for exactly those bytes next. Returns not_by_reference
// when the bytes must be copied instead (no pipe could be made).
ssize_t send_by_reference(int fd, SocketState& state, SentByReference& payload, const std::byte* data,
                          std::size_t length) {
  if (!flush_held(fd, state)) return -1;
  if (state.in_pipe == 0) {
    if (!make_send_pipe(state)) return not_by_reference;
    iovec pages{const_cast<std::byte*>(data), length};
    ssize_t handed = ::vmsplice(state.send_pipe[1], &pages, 1, SPLICE_F_NONBLOCK);
    if (handed <= 0) return payload.referenced ? -1 : not_by_reference;
    payload.referenced += std::size_t(handed);
    state.in_pipe = std::size_t(handed);
    state.pipe_end = data + handed;
  } else if (data != state.pipe_end - state.in_pipe) {
    // libnbd resumes where the socket stopped; anything else would send the
    // pipe's bytes in the wrong place. Fail the connection rather than the data.
    errno = EIO;
    return -1;
  }
  ssize_t taken = ::splice(state.send_pipe[0], nullptr, fd, nullptr, state.in_pipe, SPLICE_F_NONBLOCK);
  if (taken <= 0) {
    if (taken == 0) errno = EAGAIN;
    return -1;
  }
  state.in_pipe -= std::size_t(taken);
  return taken;
}

}  // namespace

bool expect_payload(int fd, PipedPayload* payload) {
  SocketState* state = state_of(fd);
  return state && add_registered(state->piped, state->piped_count, payload);
}

void forget_payload(int fd, PipedPayload* payload) {
  if (SocketState* state = state_of(fd)) remove_registered(state->piped, state->piped_count, payload);
}

bool expect_send(int fd, SentByReference* payload) {
  SocketState* state = state_of(fd);
  return state && add_registered(state->by_reference, state->by_reference_count, payload);
}

void forget_send(int fd, SentByReference* payload) {
  if (SocketState* state = state_of(fd)) remove_registered(state->by_reference, state->by_reference_count, payload);
}

bool attach(int fd) {
  if (fd < 0 || fd >= table_size) return false;
  delete table[fd].exchange(new SocketState, std::memory_order_acq_rel);
  return true;
}

bool attached(int fd) { return state_of(fd) != nullptr; }

std::size_t buffered_input(int fd) {
  SocketState* state = state_of(fd);
  return state ? state->buffered() : 0;
}

Fill fill(int fd) {
  SocketState* state = state_of(fd);
  if (!state) return Fill::empty;
  if (state->input_ended || state->input_error) return state->buffered() ? Fill::data : Fill::ended;
  if (state->input_end >= state->read_ahead()) return Fill::data;  // let libnbd drain it first
  std::byte peeked;
  ssize_t got = state->inside_large_payload || !state->recv_seen
                    ? ::recvfrom(fd, &peeked, 1, MSG_DONTWAIT | MSG_PEEK, nullptr, nullptr)
                    : ::recvfrom(fd, state->input.get() + state->input_end, state->read_ahead() - state->input_end,
                                 MSG_DONTWAIT, nullptr, nullptr);
  if (got > 0) {
    if (!state->inside_large_payload && state->recv_seen) state->input_end += std::size_t(got);
    return Fill::data;
  }
  if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
    return state->buffered() ? Fill::data : Fill::empty;
  if (got == 0) state->input_ended = true;
  else state->input_error = errno;
  return state->buffered() ? Fill::data : Fill::ended;
}

std::size_t held_output(int fd) {
  SocketState* state = state_of(fd);
  return state ? state->held() : 0;
}

bool flush(int fd) {
  SocketState* state = state_of(fd);
  return !state || flush_held(fd, *state);
}

}  // namespace nbd_client::socket_batching

using namespace nbd_client::socket_batching;

extern "C" {

int __close(int fd);

ssize_t recv(int fd, void* buffer, size_t length, int flags) {
  SocketState* state = state_of(fd);
  if (!state || flags != 0 || length == 0) return ::recvfrom(fd, buffer, length, flags, nullptr, nullptr);
  state->recv_seen = true;
  if (length > reply_header_limit && buffer != state->resumes_at) state->large_payloads = length >= large_payload;
  ssize_t result = receive_batched(fd, *state, buffer, length);
  if (result > 0 && std::size_t(result) < length)
    state->resumes_at = static_cast<const std::byte*>(buffer) + result;
  else
    state->resumes_at = result < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) ? static_cast<const std::byte*>(buffer) : nullptr;
  return result;
}
ssize_t send(int fd, const void* data, size_t length, int flags) {
  SocketState* state = state_of(fd);
  if (!state) return ::sendto(fd, data, length, flags, nullptr, 0);
  if (state->by_reference_count || state->in_pipe) {
    if (SentByReference* payload = registered_at(state->by_reference, state->by_reference_count, data, length)) {
      ssize_t result = send_by_reference(fd, *state, *payload, static_cast<const std::byte*>(data), length);
      if (result != not_by_reference) return result;
    } else if (state->in_pipe) {
      errno = EIO;  // the rest of a payload forgotten part way: the stream cannot go on
      return -1;
    }
  }
  if (state->held() + length <= output_hold_limit) {
    // Copied, not referenced: libnbd reuses its header buffer for the next
    // request, and a copied payload (at most 64 KiB held) cannot depend on when
    // its owner lets go of it, for a few hundred nanoseconds per 4 KiB.
    const auto* bytes = static_cast<const std::byte*>(data);
    state->output.insert(state->output.end(), bytes, bytes + length);
    return ssize_t(length);
  }
  // Too much to hold (a large payload): what is held goes out first, with it.
  if (state->held() == 0) return ::sendto(fd, data, length, flags, nullptr, 0);
  return send_joined(fd, *state, data, length, flags & ~MSG_MORE);
}

// libnbd shuts the write side after queueing NBD_CMD_DISC, which it counts as
// sent: held bytes go out first, or the server never sees the goodbye.
int shutdown(int fd, int how) {
  if (SocketState* state = state_of(fd); state && how != SHUT_RD) flush_held(fd, *state);
  return int(::syscall(SYS_shutdown, fd, how));  // glibc exports no other name for it
}

// A descriptor number is reused as soon as it is closed: drop its state first,
// so a new socket never sees an old one's bytes.
int close(int fd) {
  forget(fd);
  return __close(fd);  // the C library's close() under its exported alias
}

}  // extern "C"
