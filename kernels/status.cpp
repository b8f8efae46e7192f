#include "kernels/status.hpp"

namespace nibble::kernels {

const char* status_name(Status status) {
  switch (status) {
    case Status::ok:
      return "ok";
    case Status::invalid_argument:
      return "invalid_argument";
    case Status::unsupported_type:
      return "unsupported_type";
    case Status::device_error:
      return "device_error";
  }
  return "unknown";
}

}  // namespace nibble::kernels
