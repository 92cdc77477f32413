ID = "bybit"
