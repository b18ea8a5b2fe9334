// Conversion of nanobind ndarrays (DLPack; torch tensors arrive detached) into TensorRef.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <optional>

#include "mka/tensor.h"

namespace mka::bind {

using Array = nanobind::ndarray<>;
using OptArray = std::optional<Array>;

TensorRef ref(const Array& a, const char* name);
TensorRef ref(const OptArray& a, const char* name);  // None -> absent

}  // namespace mka::bind
