"""From image folders to the files an archive carries, one subpackage per step: ``data``
(check, split, resize, count; the datasets training reads) -> ``fit`` (train to a
checkpoint) -> ``evaluation`` (accuracy, the linear probe, figures, errors) -> ``export``
(TorchScript, labels, model-config.yaml). ``demo`` generates data for the demo and the
tests; ``progress`` and ``figures`` serve every step."""
