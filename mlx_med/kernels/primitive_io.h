// What every CPU primitive here does before its work: register its inputs with the stream's command
// encoder, give each output fresh memory and register it too (MLX then keeps the inputs alive until the
// dispatched work has run).
#pragma once

#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"

namespace mlx_med {

inline mlx::core::cpu::CommandEncoder& encode_io(mlx::core::Stream stream, const std::vector<mlx::core::array>& inputs,
                                                 std::vector<mlx::core::array>& outputs) {
  auto& encoder = mlx::core::cpu::get_command_encoder(stream);
  for (auto& a : inputs) encoder.set_input_array(a);
  for (auto& a : outputs) {
    a.set_data(mlx::core::allocator::malloc(a.nbytes()));
    encoder.set_output_array(a);
  }
  return encoder;
}

}  // namespace mlx_med
