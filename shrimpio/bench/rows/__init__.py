"""The rows of ``shrimpio bench``, one module per family; each gives
``specs()`` (the rows, in table order) and the measurements behind them."""
