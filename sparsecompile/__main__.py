from sparsecompile.cli import main

main()
