"""Development tooling (container setup, benchmark reports): not part of the shipped packages."""
