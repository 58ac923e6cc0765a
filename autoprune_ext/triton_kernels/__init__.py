"""Triton kernels of the ``triton`` backend, one module per op family (Liger-style: the kernels and
their host-side launcher live together).

* :mod:`.elementwise`   -- ``apply_mask`` and ``mask_backward`` (weight and unit granularity);
* :mod:`.adam`          -- ``aux_adam_step_`` and the multi-tensor ``aux_adam_step_multi_``;
* :mod:`.masked_matmul` -- ``masked_linear`` forward and backward with the mask applied while ``W``
  tiles are loaded, and ``dW`` / ``dM`` produced in the epilogue of the ``dT`` GEMM;
* :mod:`.nm`            -- ``nm_scores`` (N:M granularity);
* :mod:`._common`       -- shared ``@triton.jit`` helpers (surrogates, rules, scalar handling).

Importing this package requires ``triton``. ``TRITON_INTERPRET=1`` must be set *before* the first
import for the kernels to run on CPU tensors (Triton decides at decoration time);
:data:`._common.INTERPRETED` records what was in effect.
"""
