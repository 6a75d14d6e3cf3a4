"""One reader/writer per benchmark family."""
