// recv()/send() batching on a real socket pair: bytes arrive intact and in order
// whichever way libnbd asks for them, the end of stream is reported after the
// bytes before it, held bytes go out before anything else, and close() forgets.
#include "nbd_client/socket_batching.hpp"

#include <doctest/doctest.h>

#include <cerrno>
#include <cstdint>
#include <csignal>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

namespace batching = nbd_client::socket_batching;

namespace {

// `ours` is attached and non-blocking, as libnbd leaves its socket; `peer` is the server,
// blocking, but its reads give up after 5 s (EAGAIN): bytes that never come fail the test
// instead of hanging it.
struct SocketPair {
  int ours = -1;
  int peer = -1;
  SocketPair() {
    int fds[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0);
    ours = fds[0];
    peer = fds[1];
    timeval timeout{5, 0};
    REQUIRE(setsockopt(peer, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout) == 0);
    fcntl(ours, F_SETFL, fcntl(ours, F_GETFL) | O_NONBLOCK);
    REQUIRE(batching::attach(ours));
  }
  ~SocketPair() {
    if (ours >= 0) close(ours);
    if (peer >= 0) close(peer);
  }
};

std::vector<std::uint8_t> pattern(std::size_t length, std::uint8_t seed) {
  std::vector<std::uint8_t> bytes(length);
  for (std::size_t i = 0; i < length; ++i) bytes[i] = std::uint8_t(seed + i * 7 + i / 251);
  return bytes;
}

std::vector<std::uint8_t> joined(std::vector<std::uint8_t> first, const std::vector<std::uint8_t>& second) {
  first.insert(first.end(), second.begin(), second.end());
  return first;
}

void write_all(int fd, const std::vector<std::uint8_t>& bytes) {
  std::size_t done = 0;
  while (done < bytes.size()) {
    ssize_t wrote = ::write(fd, bytes.data() + done, bytes.size() - done);
    REQUIRE(wrote > 0);
    done += std::size_t(wrote);
  }
}

// Writes the stream from a child process: it may not fit the socket's buffer.
pid_t write_from_child(int fd, const std::vector<std::uint8_t>& stream) {
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    std::size_t done = 0;
    while (done < stream.size()) {
      ssize_t wrote = ::write(fd, stream.data() + done, stream.size() - done);
      if (wrote <= 0) _exit(1);
      done += std::size_t(wrote);
    }
    _exit(0);
  }
  return child;
}

// Waits (at most 5 s) for the writing child; a child still blocked is killed.
void check_child_done(pid_t child) {
  int status = -1;
  for (int tries = 0; tries < 500 && waitpid(child, &status, WNOHANG) == 0; ++tries) usleep(10000);
  if (status == -1) {
    kill(child, SIGKILL);
    waitpid(child, nullptr, 0);
  }
  CHECK(status == 0);
}

// Reads exactly `length` bytes through the batched recv(), as libnbd does: a
// partial read means "call again".
std::vector<std::uint8_t> receive_exactly(int fd, std::size_t length) {
  std::vector<std::uint8_t> bytes(length);
  std::size_t done = 0;
  for (int calls = 0; done < length; ++calls) {
    REQUIRE(calls < 100000);
    ssize_t got = recv(fd, bytes.data() + done, length - done, 0);
    if (got < 0 && errno == EAGAIN) continue;
    REQUIRE(got > 0);
    done += std::size_t(got);
  }
  return bytes;
}

}  // namespace

TEST_CASE("a small recv reads the replies behind it ahead, and later ones are served from the buffer") {
  SocketPair sockets;
  auto header = pattern(16, 1), payload = pattern(4096, 2), next_header = pattern(16, 3);
  std::vector<std::uint8_t> stream = header;
  stream.insert(stream.end(), payload.begin(), payload.end());
  stream.insert(stream.end(), next_header.begin(), next_header.end());
  write_all(sockets.peer, stream);

  CHECK(receive_exactly(sockets.ours, 16) == header);
  CHECK(batching::buffered_input(sockets.ours) == 4096 + 16);
  CHECK(receive_exactly(sockets.ours, 4096) == payload);
  CHECK(receive_exactly(sockets.ours, 16) == next_header);
  CHECK(batching::buffered_input(sockets.ours) == 0);
  char byte;
  CHECK(recv(sockets.ours, &byte, 1, 0) == -1);
  CHECK(errno == EAGAIN);
}

TEST_CASE("a payload larger than the read-ahead buffer arrives whole and in order") {
  SocketPair sockets;
  const std::size_t payload_length = 3 * batching::input_capacity + 123;
  auto header = pattern(16, 4), payload = pattern(payload_length, 5), trailer = pattern(16, 6);
  auto next_payload = pattern(2 * batching::input_capacity, 18);
  std::vector<std::uint8_t> stream = header;
  stream.insert(stream.end(), payload.begin(), payload.end());
  stream.insert(stream.end(), trailer.begin(), trailer.end());
  stream.insert(stream.end(), next_payload.begin(), next_payload.end());
  pid_t child = write_from_child(sockets.peer, stream);
  CHECK(receive_exactly(sockets.ours, 16) == header);
  CHECK(receive_exactly(sockets.ours, payload_length) == payload);
  CHECK(receive_exactly(sockets.ours, 16) == trailer);
  // After a large payload, a header read brings only a little of the next one along.
  CHECK(batching::buffered_input(sockets.ours) <= batching::short_read_ahead);
  CHECK(receive_exactly(sockets.ours, next_payload.size()) == next_payload);
  check_child_done(child);
}

TEST_CASE("the rest of a large payload asked for after a short read keeps read-ahead short") {
  SocketPair sockets;
  // A first large payload tells recv() that payloads are large.
  auto first_header = pattern(16, 20), first_payload = pattern(2 * batching::large_payload, 21);
  write_all(sockets.peer, joined(first_header, first_payload));
  CHECK(receive_exactly(sockets.ours, 16) == first_header);
  CHECK(receive_exactly(sockets.ours, first_payload.size()) == first_payload);
  // The next payload arrives in two parts: libnbd's first recv() returns short,
  // and it asks for the rest, less than large_payload, at the address after it.
  auto header = pattern(16, 22), payload = pattern(batching::large_payload + 4000, 23);
  auto trailer = pattern(16, 24), next_payload = pattern(2 * batching::input_capacity, 25);
  const std::size_t first_part = 10000;
  write_all(sockets.peer, joined(header, std::vector<std::uint8_t>(payload.begin(), payload.begin() + first_part)));
  CHECK(receive_exactly(sockets.ours, 16) == header);
  std::vector<std::uint8_t> received(payload.size());
  std::size_t done = 0;
  for (int calls = 0; done < first_part; ++calls) {
    REQUIRE(calls < 10);
    ssize_t got = recv(sockets.ours, received.data() + done, received.size() - done, 0);
    REQUIRE(got > 0);
    done += std::size_t(got);
  }
  CHECK(done == first_part);
  write_all(sockets.peer, joined(joined(std::vector<std::uint8_t>(payload.begin() + first_part, payload.end()), trailer),
                                 std::vector<std::uint8_t>(next_payload.begin(), next_payload.begin() + 100000)));
  const std::size_t rest = payload.size() - done;
  REQUIRE(rest < batching::large_payload);
  REQUIRE(rest > batching::reply_header_limit);
  CHECK(recv(sockets.ours, received.data() + done, rest, 0) == ssize_t(rest));
  CHECK(received == payload);
  CHECK(batching::buffered_input(sockets.ours) <= batching::short_read_ahead);
  CHECK(receive_exactly(sockets.ours, 16) == trailer);
}

TEST_CASE("fill only looks until recv() has been seen on the socket, then reads ahead") {
  SocketPair sockets;
  write_all(sockets.peer, pattern(10, 19));
  CHECK(batching::fill(sockets.ours) == batching::Fill::data);
  CHECK(batching::buffered_input(sockets.ours) == 0);  // still in the socket
  char byte;
  CHECK(recv(sockets.ours, &byte, 1, 0) == 1);
  CHECK(batching::buffered_input(sockets.ours) == 9);
}

TEST_CASE("fill reports data, nothing, and the end of the stream after the bytes before it") {
  SocketPair sockets;
  char first;
  write_all(sockets.peer, pattern(1, 7));
  CHECK(recv(sockets.ours, &first, 1, 0) == 1);  // as libnbd reads once before fill() reads ahead
  CHECK(batching::fill(sockets.ours) == batching::Fill::empty);
  write_all(sockets.peer, pattern(10, 7));
  CHECK(batching::fill(sockets.ours) == batching::Fill::data);
  CHECK(batching::buffered_input(sockets.ours) == 10);
  close(sockets.peer);
  sockets.peer = -1;
  CHECK(batching::fill(sockets.ours) == batching::Fill::data);  // bytes still buffered
  char bytes[100];
  CHECK(recv(sockets.ours, bytes, 5, 0) == 5);
  CHECK(recv(sockets.ours, bytes, sizeof bytes, 0) == 5);
  CHECK(batching::fill(sockets.ours) == batching::Fill::ended);
  CHECK(recv(sockets.ours, bytes, sizeof bytes, 0) == 0);
}

// Reads `length` bytes from the peer's side (not attached: the C library's read()).
std::vector<std::uint8_t> peer_reads(int fd, std::size_t length) {
  std::vector<std::uint8_t> bytes(length);
  std::size_t done = 0;
  while (done < length) {
    ssize_t got = ::read(fd, bytes.data() + done, length - done);
    REQUIRE(got > 0);
    done += std::size_t(got);
  }
  return bytes;
}

TEST_CASE("sends are held until flush, then go out together and in order") {
  SocketPair sockets;
  auto header = pattern(28, 8), payload = pattern(4096, 9);
  CHECK(send(sockets.ours, header.data(), header.size(), MSG_NOSIGNAL | MSG_MORE) == 28);
  CHECK(send(sockets.ours, payload.data(), payload.size(), MSG_NOSIGNAL) == 4096);
  CHECK(batching::held_output(sockets.ours) == 28 + 4096);
  char byte;
  CHECK(::recv(sockets.peer, &byte, 1, MSG_DONTWAIT) == -1);  // nothing on the wire yet
  CHECK(batching::flush(sockets.ours));
  CHECK(batching::held_output(sockets.ours) == 0);
  CHECK(peer_reads(sockets.peer, 28 + 4096) == joined(header, payload));
}

TEST_CASE("a send too large to hold takes the held bytes with it") {
  SocketPair sockets;
  auto header = pattern(28, 15), payload = pattern(4 * batching::output_hold_limit, 16);
  CHECK(send(sockets.ours, header.data(), header.size(), MSG_NOSIGNAL) == 28);
  ssize_t sent = send(sockets.ours, payload.data(), payload.size(), MSG_NOSIGNAL);
  REQUIRE(sent > 0);
  CHECK(batching::held_output(sockets.ours) == 0);
  auto expected = joined(header, std::vector<std::uint8_t>(payload.begin(), payload.begin() + sent));
  CHECK(peer_reads(sockets.peer, expected.size()) == expected);
}

TEST_CASE("held bytes wait for a full socket and still go out before later ones") {
  SocketPair sockets;
  auto filler = pattern(65536, 10);
  std::size_t queued = 0;
  for (;;) {  // fill the socket around the batching layer
    ssize_t sent = ::sendto(sockets.ours, filler.data(), filler.size(), MSG_NOSIGNAL, nullptr, 0);
    if (sent < 0) {
      REQUIRE(errno == EAGAIN);
      break;
    }
    queued += std::size_t(sent);
  }
  auto header = pattern(28, 11), payload = pattern(100, 12);
  CHECK(send(sockets.ours, header.data(), header.size(), MSG_NOSIGNAL | MSG_MORE) == 28);
  CHECK(send(sockets.ours, payload.data(), payload.size(), MSG_NOSIGNAL) == 100);
  CHECK_FALSE(batching::flush(sockets.ours));
  CHECK(batching::held_output(sockets.ours) == 128);
  // Past the hold limit with the socket full: "try again", and nothing taken.
  auto large = pattern(batching::output_hold_limit, 17);
  CHECK(send(sockets.ours, large.data(), large.size(), MSG_NOSIGNAL) == -1);
  CHECK(errno == EAGAIN);
  CHECK(batching::held_output(sockets.ours) == 128);
  peer_reads(sockets.peer, queued);
  CHECK(batching::flush(sockets.ours));
  CHECK(peer_reads(sockets.peer, 128) == joined(header, payload));
}

TEST_CASE("shutdown sends held bytes before closing the write side") {
  SocketPair sockets;
  auto goodbye = pattern(28, 20);
  CHECK(send(sockets.ours, goodbye.data(), goodbye.size(), MSG_NOSIGNAL) == 28);
  CHECK(batching::held_output(sockets.ours) == 28);
  CHECK(shutdown(sockets.ours, SHUT_WR) == 0);
  CHECK(peer_reads(sockets.peer, 28) == goodbye);
  char byte;
  CHECK(::read(sockets.peer, &byte, 1) == 0);  // then the end of the stream (-1 if SO_RCVTIMEO ran out)
}

TEST_CASE("close forgets a socket, so a new one with its number starts clean") {
  int number;
  {
    SocketPair sockets;
    write_all(sockets.peer, pattern(32, 13));
    char byte;
    CHECK(recv(sockets.ours, &byte, 1, 0) == 1);
    CHECK(batching::buffered_input(sockets.ours) == 31);
    number = sockets.ours;
  }
  CHECK_FALSE(batching::attached(number));
  CHECK(batching::buffered_input(number) == 0);
  int fds[2];
  REQUIRE(socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0);
  // Not attached: recv() is the C library's, whatever number the socket got.
  write_all(fds[1], pattern(4, 14));
  char bytes[8];
  CHECK(recv(fds[0], bytes, sizeof bytes, 0) == 4);
  CHECK(batching::buffered_input(fds[0]) == 0);
  close(fds[0]);
  close(fds[1]);
}

namespace {

struct Pipe {
  int read_end = -1;
  int write_end = -1;
  explicit Pipe(int size) {
    int ends[2];
    REQUIRE(pipe2(ends, O_NONBLOCK | O_CLOEXEC) == 0);
    read_end = ends[0];
    write_end = ends[1];
    REQUIRE(fcntl(write_end, F_SETPIPE_SZ, size) >= size);
  }
  ~Pipe() {
    close(read_end);
    close(write_end);
  }
  std::vector<std::uint8_t> contents() const {
    std::vector<std::uint8_t> bytes(4 << 20);
    ssize_t got = ::read(read_end, bytes.data(), bytes.size());
    bytes.resize(got > 0 ? std::size_t(got) : 0);
    return bytes;
  }
};


// libnbd's way of reading a payload into its buffer: recv() until all is there.
void receive_into(int fd, std::uint8_t* buffer, std::size_t length) {
  std::size_t done = 0;
  for (int calls = 0; done < length; ++calls) {
    REQUIRE(calls < 1000000);
    ssize_t got = recv(fd, buffer + done, length - done, 0);
    if (got < 0 && errno == EAGAIN) continue;
    REQUIRE(got > 0);
    done += std::size_t(got);
  }
}

// A socket pair, a pipe, and a zeroed buffer of `length` whose payload is
// expected to go to the pipe.
struct PipedRead {
  SocketPair sockets;
  Pipe pipe;
  std::vector<std::uint8_t> buffer;
  batching::PipedPayload piped;
  PipedRead(std::size_t length, int pipe_size)
      : pipe(pipe_size),
        buffer(length, 0),
        piped{reinterpret_cast<std::byte*>(buffer.data()), length, pipe.write_end} {
    REQUIRE(batching::expect_payload(sockets.ours, &piped));
  }
  void receive(std::size_t offset, std::size_t length) { receive_into(sockets.ours, buffer.data() + offset, length); }
  void forget() { batching::forget_payload(sockets.ours, &piped); }
};

}  // namespace

TEST_CASE("an expected payload goes to its pipe in order, and its buffer is not written") {
  const std::size_t length = 256 * 1024;
  PipedRead read(length, 1 << 20);
  auto header = pattern(16, 21), payload = pattern(length, 22), trailer = pattern(16, 23);
  pid_t child = write_from_child(read.sockets.peer, joined(joined(header, payload), trailer));
  CHECK(receive_exactly(read.sockets.ours, 16) == header);  // reads part of the payload ahead
  read.receive(0, length);
  read.forget();
  CHECK(read.piped.piped == length);
  CHECK_FALSE(read.piped.diverted);
  CHECK(read.pipe.contents() == payload);
  CHECK(read.buffer == std::vector<std::uint8_t>(length, 0));
  CHECK(receive_exactly(read.sockets.ours, 16) == trailer);
  check_child_done(child);
}

TEST_CASE("a payload read out of order stays in its buffer") {
  const std::size_t length = 64 * 1024;
  PipedRead read(length, 1 << 20);
  auto payload = pattern(length, 24);
  write_all(read.sockets.peer, payload);
  // A structured reply's second chunk first: not where the pipe has got to.
  read.receive(length / 2, length / 2);
  read.receive(0, length / 2);
  read.forget();
  CHECK(read.piped.diverted);
  CHECK(read.piped.piped == 0);
  std::vector<std::uint8_t> expected(payload.begin() + length / 2, payload.end());
  expected.insert(expected.end(), payload.begin(), payload.begin() + length / 2);
  CHECK(read.buffer == expected);
  CHECK(read.pipe.contents().empty());
}

TEST_CASE("when the pipe is full the rest of the payload goes to its buffer") {
  const std::size_t length = 128 * 1024;
  PipedRead read(length, 4096);  // one page
  auto header = pattern(16, 25), payload = pattern(length, 26);
  pid_t child = write_from_child(read.sockets.peer, joined(header, payload));
  CHECK(receive_exactly(read.sockets.ours, 16) == header);
  read.receive(0, length);
  read.forget();
  const std::size_t piped = read.piped.piped;
  CHECK(read.piped.diverted);
  REQUIRE(piped > 0);
  REQUIRE(piped < length);
  CHECK(read.pipe.contents() == std::vector<std::uint8_t>(payload.begin(), payload.begin() + long(piped)));
  CHECK(std::vector<std::uint8_t>(read.buffer.begin() + long(piped), read.buffer.end()) ==
        std::vector<std::uint8_t>(payload.begin() + long(piped), payload.end()));
  check_child_done(child);
}

TEST_CASE("a forgotten payload is read into its buffer as usual") {
  const std::size_t length = 32 * 1024;
  PipedRead read(length, 1 << 20);
  auto payload = pattern(length, 27);
  write_all(read.sockets.peer, payload);
  read.forget();
  read.receive(0, length);
  CHECK(read.buffer == payload);
  CHECK(read.piped.piped == 0);
  CHECK(read.pipe.contents().empty());
}

namespace {

// A socket pair and a payload registered to be sent by reference, sent the way
// libnbd sends: send() from where the last call stopped until all is out.
struct ReferencedWrite {
  SocketPair sockets;
  std::vector<std::uint8_t> buffer;
  batching::SentByReference payload;
  explicit ReferencedWrite(std::vector<std::uint8_t> bytes)
      : buffer(std::move(bytes)), payload{reinterpret_cast<const std::byte*>(buffer.data()), buffer.size()} {
    REQUIRE(batching::expect_send(sockets.ours, &payload));
  }
  const std::uint8_t* at(std::size_t offset) const { return buffer.data() + offset; }
  // Sends from `offset` on; whenever the socket is full the peer reads what it
  // holds into `received`. Returns where the payload's sending got to.
  std::size_t send_all(std::size_t offset, std::vector<std::uint8_t>& received) {
    for (int calls = 0; offset < buffer.size(); ++calls) {
      REQUIRE(calls < 100000);
      ssize_t sent = send(sockets.ours, at(offset), buffer.size() - offset, MSG_NOSIGNAL);
      if (sent < 0) {
        REQUIRE(errno == EAGAIN);
        drain_peer(received);
        continue;
      }
      offset += std::size_t(sent);
    }
    return offset;
  }
  void drain_peer(std::vector<std::uint8_t>& received) {
    std::vector<std::uint8_t> chunk(1 << 20);
    ssize_t got = ::recv(sockets.peer, chunk.data(), chunk.size(), MSG_DONTWAIT);
    if (got > 0) received.insert(received.end(), chunk.begin(), chunk.begin() + got);
  }
};

}  // namespace

TEST_CASE("a payload sent by reference follows the held header, and the socket has its pages, not a copy") {
  const std::size_t length = 64 * 1024;  // fits the socket whole
  ReferencedWrite write(pattern(length, 31));
  auto header = pattern(28, 30);
  CHECK(send(write.sockets.ours, header.data(), header.size(), MSG_NOSIGNAL | MSG_MORE) == 28);
  std::vector<std::uint8_t> received;
  CHECK(write.send_all(0, received) == length);
  CHECK(write.payload.referenced == length);
  CHECK(batching::held_output(write.sockets.ours) == 0);
  // Changed after send() reported it sent: the peer reads the change, which is
  // why the owner may not touch the pages before the server has answered.
  write.buffer[100] ^= 0xff;
  received = peer_reads(write.sockets.peer, 28 + length);
  CHECK(received == joined(header, write.buffer));
  batching::forget_send(write.sockets.ours, &write.payload);
}

TEST_CASE("a payload larger than the socket and the pipe goes out whole and in order, by reference") {
  const std::size_t length = 3 * batching::send_pipe_size + 4096 + 80;
  ReferencedWrite write(pattern(length, 32));
  auto header = pattern(28, 33), trailer = pattern(28, 34);
  CHECK(send(write.sockets.ours, header.data(), header.size(), MSG_NOSIGNAL | MSG_MORE) == 28);
  std::vector<std::uint8_t> received;
  // From an address that is not page-aligned, as a FUSE WRITE's payload is.
  CHECK(write.send_all(0, received) == length);
  CHECK(write.payload.referenced == length);
  batching::forget_send(write.sockets.ours, &write.payload);
  CHECK(send(write.sockets.ours, trailer.data(), trailer.size(), MSG_NOSIGNAL) == 28);
  CHECK(batching::flush(write.sockets.ours));
  auto rest = peer_reads(write.sockets.peer, 28 + length + 28 - received.size());
  received.insert(received.end(), rest.begin(), rest.end());
  CHECK(received == joined(joined(header, write.buffer), trailer));
}

TEST_CASE("bytes left in the pipe by a full socket go first, and a send from elsewhere is refused") {
  ReferencedWrite write(pattern(256 * 1024, 35));
  auto filler = pattern(65536, 36);
  std::size_t queued = 0;
  for (;;) {  // fill the socket around the batching layer
    ssize_t sent = ::sendto(write.sockets.ours, filler.data(), filler.size(), MSG_NOSIGNAL | MSG_DONTWAIT, nullptr, 0);
    if (sent < 0) {
      REQUIRE(errno == EAGAIN);
      break;
    }
    queued += std::size_t(sent);
  }
  // The pages go into the pipe; the socket takes none of them.
  CHECK(send(write.sockets.ours, write.at(0), write.buffer.size(), MSG_NOSIGNAL) == -1);
  CHECK(errno == EAGAIN);
  CHECK(write.payload.referenced > 0);
  // libnbd never skips ahead; if anything did, the pipe's bytes would land in
  // the wrong place: refused, so the connection fails instead of the data.
  CHECK(send(write.sockets.ours, write.at(4096), write.buffer.size() - 4096, MSG_NOSIGNAL) == -1);
  CHECK(errno == EIO);
  std::vector<std::uint8_t> received = peer_reads(write.sockets.peer, queued);
  received.clear();
  CHECK(write.send_all(0, received) == write.buffer.size());
  auto rest = peer_reads(write.sockets.peer, write.buffer.size() - received.size());
  received.insert(received.end(), rest.begin(), rest.end());
  CHECK(received == write.buffer);
  batching::forget_send(write.sockets.ours, &write.payload);
}

TEST_CASE("a payload no longer registered is copied") {
  ReferencedWrite write(pattern(64 * 1024, 37));
  batching::forget_send(write.sockets.ours, &write.payload);
  const auto original = write.buffer;
  std::vector<std::uint8_t> received;
  CHECK(write.send_all(0, received) == write.buffer.size());
  CHECK(batching::flush(write.sockets.ours));  // held, or sent: copied either way
  write.buffer[100] ^= 0xff;  // too late to matter: the socket has its own copy
  CHECK(write.payload.referenced == 0);
  CHECK(peer_reads(write.sockets.peer, original.size()) == original);
}
