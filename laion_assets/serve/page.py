PAGE = "<html><body>page</body></html>"
