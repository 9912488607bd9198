// mvlt patch (vendor/README.md): a bridge to c10d, PyTorch's distributed engine, inside the
// libtorch that tch links: a TCPStore for the rendezvous (torchrun's, or one this process hosts),
// a Gloo process group, and all-reduce, broadcast and barrier on libtorch tensors, each bounded by
// a timeout. Each function returns 0, or 1 with a message for `burn_tch_c10d_last_error`.
//
// Why C++: c10d has no C API and tch binds none of it. The classes are exported by libtorch_cpu.so
// (ProcessGroupNCCL by libtorch_cuda.so, not bridged yet: see native/c10d.rs).
#define USE_C10D_GLOO 1
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {
thread_local char last_error[4096];

void set_error(const char *message) {
  std::strncpy(last_error, message, sizeof(last_error) - 1);
  last_error[sizeof(last_error) - 1] = '\0';
}

// c10's errors carry a C++ backtrace in what(); the message alone is what a user needs.
template <typename F> int guarded(F f) {
  try {
    f();
    return 0;
  } catch (const c10::Error &e) {
    set_error(e.what_without_backtrace());
  } catch (const std::exception &e) {
    set_error(e.what());
  } catch (...) {
    set_error("unknown C++ exception");
  }
  return 1;
}

struct Store {
  c10::intrusive_ptr<c10d::Store> store;
};

struct Group {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

void wait(const c10::intrusive_ptr<c10d::Work> &work, std::chrono::milliseconds timeout) {
  if (!work->wait(timeout)) {
    throw std::runtime_error("the collective did not finish within the timeout");
  }
}
} // namespace

extern "C" {
const char *burn_tch_c10d_last_error() { return last_error; }

// A TCPStore at host:port: the server when `listen_fd` >= 0 (a socket the caller bound and listens
// on, so that the address it binds is the caller's choice), else a client. Keys live under
// `prefix` when it is not empty (torchrun's store outlives restarts: each attempt has its own).
int burn_tch_c10d_store(const char *host, int port, int listen_fd, int world, int64_t timeout_ms,
                        const char *prefix, void **out) {
  *out = nullptr;
  return guarded([&] {
    c10d::TCPStoreOptions o;
    o.port = static_cast<std::uint16_t>(port);
    o.isServer = listen_fd >= 0;
    if (listen_fd >= 0) {
      o.masterListenFd = listen_fd;
    }
    o.numWorkers = world;
    o.waitWorkers = false;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::Store> s = c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
    if (prefix != nullptr && prefix[0] != '\0') {
      s = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), s);
    }
    *out = new Store{s};
  });
}

void burn_tch_c10d_store_free(void *store) { delete static_cast<Store *>(store); }

int burn_tch_c10d_store_set(void *store, const char *key, const uint8_t *data, size_t len) {
  return guarded([&] { static_cast<Store *>(store)->store->set(key, std::vector<uint8_t>(data, data + len)); });
}

// The value of `key`, waiting up to the store's timeout for it; `*data` is malloc'ed (free with
// burn_tch_c10d_bytes_free).
int burn_tch_c10d_store_get(void *store, const char *key, uint8_t **data, size_t *len) {
  *data = nullptr;
  *len = 0;
  return guarded([&] {
    auto v = static_cast<Store *>(store)->store->get(key);
    *data = static_cast<uint8_t *>(std::malloc(v.size() > 0 ? v.size() : 1));
    if (*data == nullptr) {
      throw std::bad_alloc();
    }
    std::memcpy(*data, v.data(), v.size());
    *len = v.size();
  });
}

void burn_tch_c10d_bytes_free(uint8_t *data) { std::free(data); }

// Whether `key` is set, without waiting.
int burn_tch_c10d_store_check(void *store, const char *key, int *found) {
  *found = 0;
  return guarded([&] { *found = static_cast<Store *>(store)->store->check({std::string(key)}) ? 1 : 0; });
}

// A Gloo process group over `store`. Its sockets bind the address of `hostname` when given, else
// of network interface `interface` when given, else the machine's host name (Gloo's default).
int burn_tch_c10d_gloo(void *store, int rank, int world, const char *hostname, const char *interface,
                       int64_t timeout_ms, void **out) {
  *out = nullptr;
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    if (hostname != nullptr) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(hostname));
    } else if (interface != nullptr) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(interface));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    options->threads = 2;
    c10::intrusive_ptr<c10d::Backend> pg =
        c10::make_intrusive<c10d::ProcessGroupGloo>(static_cast<Store *>(store)->store, rank, world, options);
    *out = new Group{pg, timeout};
  });
}

void burn_tch_c10d_group_free(void *group) { delete static_cast<Group *>(group); }

// In place: every rank's `tensor` becomes the sum over the ranks.
int burn_tch_c10d_all_reduce_sum(void *group, at::Tensor *tensor) {
  return guarded([&] {
    auto g = static_cast<Group *>(group);
    std::vector<at::Tensor> ts{*tensor};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    o.timeout = g->timeout;
    wait(g->backend->allreduce(ts, o), g->timeout);
  });
}

// In place: every rank's `tensor` becomes rank `root`'s.
int burn_tch_c10d_broadcast(void *group, at::Tensor *tensor, int root) {
  return guarded([&] {
    auto g = static_cast<Group *>(group);
    std::vector<at::Tensor> ts{*tensor};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = g->timeout;
    wait(g->backend->broadcast(ts, o), g->timeout);
  });
}

int burn_tch_c10d_barrier(void *group) {
  return guarded([&] {
    auto g = static_cast<Group *>(group);
    c10d::BarrierOptions o;
    o.timeout = g->timeout;
    wait(g->backend->barrier(o), g->timeout);
  });
}
}
