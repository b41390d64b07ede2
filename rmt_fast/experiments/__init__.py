"""The RMT paper's experiments on top of the library: memory tasks, backbones, curriculum training, evaluation at
many lengths, FLOP counts and the ``rmt-fast`` command. Nothing is imported here; take the module you need::

    from rmt_fast.experiments.trainer import TrainConfig, train
    from rmt_fast.experiments.evaluate import evaluate_run
    from rmt_fast.experiments.tasks import make_task, WordTokenizer

Modules: ``tasks/`` (memorize, detect & memorize, reasoning), ``backbones`` (named models), ``runtime`` (device,
autocast, distributed, seeds), ``rundir`` (the files of a run directory), ``trainer`` (curriculum),
``evaluate`` (accuracy at many lengths), ``metrics`` (accuracy, Wilson interval, peak memory), ``plots``
(matplotlib figures), ``flops`` (Fig. 3), ``cli`` (``rmt-fast``). Dependencies point one way: experiments ->
the library (``rmt_fast.wrap`` ...) -> ops.
"""
