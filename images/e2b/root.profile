# ~/.profile: executed by Bourne-compatible login shells.
#
# Flint's E2B image: Debian's, except that `mesg n` runs only on a terminal (it does nothing elsewhere, and its
# fork and exec cost seconds a command on hosts that emulate the guest kernel: images/e2b/profile).

if [ "$BASH" ]; then
  if [ -f ~/.bashrc ]; then
    . ~/.bashrc
  fi
fi

if [ -t 0 ]; then
  mesg n 2> /dev/null || true
fi
