from mrpcd.cli import main

main()
