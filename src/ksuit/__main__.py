from ksuit.cli import main

main()
