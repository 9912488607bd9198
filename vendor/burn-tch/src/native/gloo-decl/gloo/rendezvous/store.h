// mvlt patch (vendor/README.md): declarations only, written for mvlt, of the gloo types that
// c10d's ProcessGroupGloo.hpp names. PyTorch's wheel ships that header but not gloo's own headers;
// the header holds every gloo object by pointer (shared_ptr / unique_ptr) except GlooStore's base
// class below, so declarations give ProcessGroupGloo its real layout. The definitions live inside
// libtorch_cpu.so. c10d.cpp never constructs a GlooStore (libtorch does, with its own gloo), and is
// compiled with hidden visibility, so nothing here can stand in for libtorch's symbols.
#pragma once
#include <chrono>
#include <string>
#include <vector>

namespace gloo {
namespace rendezvous {
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) = 0;
};
}  // namespace rendezvous
}  // namespace gloo
