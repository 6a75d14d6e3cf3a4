"""Memory banks: what the methods retrieve from, and how they are stored on disk."""
