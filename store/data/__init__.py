"""Input datasets shared by extract/ and train/."""
