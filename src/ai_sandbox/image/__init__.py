"""Guest images: recipes in, kernel + initramfs + base root filesystem out."""
