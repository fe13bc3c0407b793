"""Fresh features: streaming aggregates (pure) and the Feast repository + client around them.

Feast is imported only inside this package (``features.store`` and ``features.repo``)."""
