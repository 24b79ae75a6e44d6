"""Hot MoE ops, one module per op. Each has a dumb per-token PyTorch reference (`*_reference`)
that the tests compare against, and the implementation the model calls. Triton kernels for
GPUs plug in here later behind the same functions.

Shape legend: T tokens, D model dim, E routed experts, K top-k, G expert groups,
N = T*K routed rows (token copies), F expert hidden dim.
"""
