"""Sample quality: :mod:`~debias.metrics.inception` (the FID Inception, resolved offline),
:mod:`~debias.metrics.features` (extraction, feature files, statistics) and
:mod:`~debias.metrics.scores` (FID, KID, precision/recall, Inception Score)."""
