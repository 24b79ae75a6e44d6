"""Hot MoE ops, one module per op. Each has a dumb per-token PyTorch reference (`*_reference`)
that the tests compare against, the PyTorch path the model runs on CPU, and a Triton kernel
(`*_triton`, autograd-aware where the op is in training) that the same function picks by itself
when its tensors are on CUDA and triton is importable.

Shape legend: T tokens, D model dim, E routed experts, K top-k, G expert groups,
N = T*K routed rows (token copies), F expert hidden dim.
"""
