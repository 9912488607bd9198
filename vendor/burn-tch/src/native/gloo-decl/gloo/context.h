// mvlt patch: declarations only; see rendezvous/store.h for why. ProcessGroupGloo.hpp's inline
// setTimeout calls Context::setTimeout; c10d.cpp never calls it (nor emits it: ProcessGroupGloo's
// virtual functions are emitted with its vtable, inside libtorch).
#pragma once
#include <chrono>
namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
namespace transport {
class Device;
class UnboundBuffer;
}  // namespace transport
}  // namespace gloo
