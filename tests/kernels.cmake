# Tests of the run-time kernel choice (issue 13, common/kernels.h). test_quant already
# checks every variant the CPU runs against the double reference and for batch
# independence; here the whole engine runs once more on each lower variant (forced with
# KVR_KERNEL), so the AVX2 and scalar paths of attention, norms and products are tested on
# an AVX-512 machine too: the golden teacher-forced logits and greedy texts (test_golden),
# batched decode with mixed KV policies equal to one sequence at a time (test_policies), and
# `kvrelay generate --verbose` naming the variant it runs, and `kvrelay generate` on every
# GGUF type against the engine in the test and llama.cpp's texts (test_cli_gguf: run_cmd
# passes KVR_KERNEL to the commands it runs, so both sides use the forced variant).
foreach(k avx2 scalar)
  add_test(NAME test_golden_${k} COMMAND test_golden)
  set_tests_properties(test_golden_${k} PROPERTIES TIMEOUT 120 LABELS "engine;kernels"
                       ENVIRONMENT "KVR_KERNEL=${k}")
  add_test(NAME test_policies_${k} COMMAND test_policies)
  set_tests_properties(test_policies_${k} PROPERTIES TIMEOUT 120 LABELS "engine;kernels"
                       ENVIRONMENT "KVR_KERNEL=${k}")
  add_test(NAME test_cli_gguf_${k} COMMAND test_cli_gguf)
  set_tests_properties(test_cli_gguf_${k} PROPERTIES TIMEOUT 300 LABELS "gguf;kernels"
                       ENVIRONMENT "KVR_KERNEL=${k}")
endforeach()

add_test(NAME kernels_verbose_forced
         COMMAND kvrelay generate --model ${KVR_SHARED_DIR}/models/stories260K.bin
                 --tokenizer ${KVR_SHARED_DIR}/models/tok512.bin --temperature 0 --steps 4 --verbose)
set_tests_properties(kernels_verbose_forced PROPERTIES TIMEOUT 60 LABELS "engine;kernels"
                     ENVIRONMENT "KVR_KERNEL=scalar" PASS_REGULAR_EXPRESSION "kernels scalar \\(CPU: ")
add_test(NAME kernels_bad_name
         COMMAND kvrelay generate --model ${KVR_SHARED_DIR}/models/stories260K.bin
                 --tokenizer ${KVR_SHARED_DIR}/models/tok512.bin --temperature 0 --steps 4 --verbose)
set_tests_properties(kernels_bad_name PROPERTIES TIMEOUT 60 LABELS "engine;kernels"
                     ENVIRONMENT "KVR_KERNEL=avx9" PASS_REGULAR_EXPRESSION "KVR_KERNEL=avx9: not one of avx512, avx2, scalar")

# The kernels' products once more under KVR_KERNEL=avx2: there the engine must not take the
# AVX512-BF16 prefill GEMM (test_gemm_bf16 checks the table), and BF16 prompt rows through
# kvr_matmul must be the f32 fused multiply-add chain again (test_prompt_gemm).
add_test(NAME test_quant_avx2 COMMAND test_quant)
set_tests_properties(test_quant_avx2 PROPERTIES TIMEOUT 60 LABELS "gguf;kernels" ENVIRONMENT "KVR_KERNEL=avx2")
