"""Running components: the engines, expert residency and the experts as the torch engine serves them."""
