"""The commands floor: everything a user runs, on top of the core, the exporters and the runtimes.

    entry.py      the command's first code: Ctrl-C and SIGTERM handled before torch loads
    cli.py        the `crnet` command line: validates options, prints, exits with code 2 on bad input
    train.py      episodic training (checkpoint + exact resume, DDP under torchrun)
    evaluate.py   the PASCAL-5i protocol: fixed episodes, k-shot strategies, the training-free baseline
    infer.py      supports + queries -> masks and overlays, with any runtime
    bench.py      every runtime on the same episodes: latency and accuracy in one table
    demo.py       the demo: train or load, evaluate, draw, export, bench
    bench_ops.py  the native refinement op against the eager loop
    floor.py      the FLOP floor: counted FLOPs at the measured matmul rate
    script_args.py  the command line of bench_ops and the scripts in benchmarks/, under the same rules
    timer.py      wall and CUDA-event timing of one call
    visualize.py  episode sheets and overlays

Nothing below this package imports it.
"""
