"""TKP's support code: what the model scripts (through tkp_common.py) and tkp_deploy.py use.

Training:   runtime (errors, flags, processes, precision, reading files), runs (a run's
            folder, lock and atomic saves), data (data sets, loaders),
            sparsity (plans, masks, the regularizer), train (the update step, an epoch,
            evaluation, BatchNorm recalibration), report (MACs, sparsity, summary),
            qat (stage 3), figures (PNGs of a run folder).
Deployment: kernels (building the C++ kernels of csrc/, the timing helper), topk_conv and
            tapgroup (the kernel layers), deploy_layers (fold, choose, fuse, check),
            deploy_format (deploy.pt).
Each module's docstring says what it may import; tests/test_layout.py checks it.
Nothing runs at import.
"""
