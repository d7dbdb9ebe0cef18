"""The toolkit's commands beyond one run (``mrecg <command>``, listed in ``mrecg.commands``): sweeps, tables,
export of a finished run, the paper's studies, benchmarks, the MQBench baseline and the model coverage."""
