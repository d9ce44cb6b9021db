// Fewer system calls on libnbd's sockets. libnbd 1.14 reads each reply field by
// field (a READ reply is two recv() calls, more when structured) and sends each
// request in its own send() calls (a WRITE's header and payload in two); it has
// no transport hook. So the process defines recv(), send(), shutdown() and
// close() itself (symbol interposition, see socket_batching.cpp). On a socket
// attached here, recv() reads ahead whatever the socket holds and later calls are
// served from that buffer, and send() only holds the bytes: the connection
// flushes them in one sendmsg() once the requests of the current batch are
// issued (shutdown() and close() flush or drop them). A READ payload expected
// for a pipe (PipedPayload) is moved there with splice() instead of being read;
// a WRITE payload registered as SentByReference goes to the socket as references
// to its pages (vmsplice() and splice() through the socket's pipe), not copied.
// Every other descriptor, and every other caller, passes straight to the C library.
// Thread rule: an attached socket is used by one thread at a time, its
// connection's (libnbd's own rule for a handle); close() detaches it.
#pragma once

#include <cstddef>

namespace nbd_client::socket_batching {

// Starts batching on fd (an established, non-TLS connection's socket). Returns
// false if fd cannot be batched (out of the table's range); nothing changes then.
bool attach(int fd);
bool attached(int fd);

// Bytes read ahead and not yet handed to libnbd: the socket itself may be empty
// while these wait, so readiness must count them.
std::size_t buffered_input(int fd);

enum class Fill {
  data,   // bytes are buffered now
  empty,  // nothing to read (EAGAIN)
  ended,  // end of stream or an error, kept for libnbd's next recv()
};
// Reads what the socket holds now into the read-ahead buffer without blocking:
// the readiness test for an attached socket, which fetches the data at the same
// cost as a poll(). It only looks (MSG_PEEK) until libnbd has read through our
// recv() once, and while libnbd is inside a large payload (read in place).
Fill fill(int fd);

// Bytes libnbd has sent, as far as it knows, that are held here. The owner of
// the socket must flush them soon: the server cannot answer what it has not seen.
std::size_t held_output(int fd);
// Writes held bytes now; true when none remain (false: the socket is full, and
// the owner waits for it to drain).
bool flush(int fd);

// The read-ahead buffer's size: replies of a depth-64 queue of 4 KiB reads fit
// a few at a time; larger payloads go straight to libnbd's buffer.
inline constexpr std::size_t input_capacity = 64 * 1024;
// libnbd asking for at least this much is reading a large payload: the part not
// yet buffered is read straight into its buffer, and while payloads are large
// only short_read_ahead is read ahead. Asking for at most reply_header_limit is
// reading a reply header (or a structured chunk's), which says nothing of payloads.
inline constexpr std::size_t large_payload = 16 * 1024;
inline constexpr std::size_t short_read_ahead = 4 * 1024;
inline constexpr std::size_t reply_header_limit = 64;
// A READ payload that goes to a pipe instead of its buffer (spliced reads: the
// pipe then feeds the FUSE reply, so the payload is never copied through user
// space). libnbd's recv() into the buffer is recognised by its address; bytes
// are moved with splice() while they arrive in order from the buffer's start.
// Owned by the command's issuer; registered from issue to completion, on the
// socket's thread.
struct PipedPayload {
  std::byte* buffer = nullptr;
  std::size_t length = 0;
  int pipe = -1;           // write end
  std::size_t piped = 0;   // buffer[0, piped) is in the pipe, not in the buffer
  bool diverted = false;   // later bytes went to the buffer (out of order, or the pipe was full)
};
// false: fd is not attached or too many payloads are expected; the read then
// lands in its buffer as usual.
bool expect_payload(int fd, PipedPayload* payload);
void forget_payload(int fd, PipedPayload* payload);
inline constexpr std::size_t max_piped_payloads = 64;

// A WRITE payload whose pages the socket takes by reference instead of a copy
// (spliced writes): libnbd's send() from inside the buffer is recognised by its
// address. The socket, and the server reading from it, see the pages themselves
// until the server has read them, so their owner must not change them before:
//  - the command has completed without error: the server answered, hence read
//    the whole payload;
//  - otherwise (a lost connection, or any failure) the bytes may still be
//    queued on a socket that a live server goes on reading: if `referenced` is
//    not zero, the owner must never write those pages again (unmap them; the
//    socket keeps its references, with the bytes as they were).
// Owned by the command's issuer; registered from issue to completion, on the
// socket's thread. splice() has no MSG_NOSIGNAL: a process sending by reference
// must ignore SIGPIPE (nbdbridge does), or a server that hangs up kills it.
struct SentByReference {
  const std::byte* buffer = nullptr;
  std::size_t length = 0;
  std::size_t referenced = 0;  // bytes handed to the socket (or its pipe) by reference
};
// false: fd is not attached or too many payloads are registered; the payload is
// then copied as usual.
bool expect_send(int fd, SentByReference* payload);
void forget_send(int fd, SentByReference* payload);
// The pipe between a payload's pages and the socket; one round of vmsplice()
// and splice() moves at most this much. Without the privilege for it (more than
// /proc/sys/fs/pipe-max-size) the pipe keeps its default size.
inline constexpr std::size_t send_pipe_size = 1u << 20;

// Sends are held up to this much (headers, small payloads); a send that would
// pass it goes out at once, after the held bytes.
inline constexpr std::size_t output_hold_limit = 64 * 1024;

}  // namespace nbd_client::socket_batching
