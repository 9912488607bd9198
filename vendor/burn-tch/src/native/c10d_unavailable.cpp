// mvlt patch: stand-ins for c10d.cpp where it is not compiled (no libtorch headers at build time,
// or Windows): every call reports it.
#include <cstddef>
#include <cstdint>

extern "C" {
const char *burn_tch_c10d_last_error() { return "this build of burn-tch has no c10d bridge (no libtorch headers, or Windows)"; }
int burn_tch_c10d_store(const char *, int, int, int, int64_t, const char *, void **out) {
  *out = nullptr;
  return 1;
}
void burn_tch_c10d_store_free(void *) {}
int burn_tch_c10d_store_set(void *, const char *, const uint8_t *, size_t) { return 1; }
int burn_tch_c10d_store_get(void *, const char *, uint8_t **data, size_t *len) {
  *data = nullptr;
  *len = 0;
  return 1;
}
void burn_tch_c10d_bytes_free(uint8_t *) {}
int burn_tch_c10d_store_check(void *, const char *, int *found) {
  *found = 0;
  return 1;
}
int burn_tch_c10d_gloo(void *, int, int, const char *, const char *, int64_t, void **out) {
  *out = nullptr;
  return 1;
}
void burn_tch_c10d_group_free(void *) {}
int burn_tch_c10d_all_reduce_sum(void *, void *) { return 1; }
int burn_tch_c10d_broadcast(void *, void *, int) { return 1; }
int burn_tch_c10d_barrier(void *) { return 1; }
}
